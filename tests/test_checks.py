"""Tests of the shared input checks: integer and number predicates, unknown keys, image batch shapes."""

import dataclasses

import pytest
import torch

from cascade.checks import check_known_keys, check_num_workers, is_int, is_int_at_least, is_number
from cascade.config import SamplingSettings, StageConfig
from cascade.imageops import check_image_batch


def test_integer_predicates_refuse_bools_floats_and_values_below_the_minimum():
    assert is_int(0) and is_int(-3) and is_int_at_least(5, 1) and is_int_at_least(0, 0)
    for value in (True, False, 1.5, 2.0, "2", None):
        assert not is_int(value) and not is_int_at_least(value, 0)
    assert not is_int_at_least(-1, 0)
    with pytest.raises(ValueError, match=r"^data.num_workers must be auto or an integer >= 0, got True$"):
        check_num_workers(True)
    for bad in (1.5, -1):
        with pytest.raises(ValueError, match=rf"^data.num_workers must be auto or an integer >= 0, got {bad}$"):
            check_num_workers(bad)
    check_num_workers("auto")


def test_number_predicate_takes_ints_and_floats_but_not_bools():
    assert is_number(1) and is_number(0.5) and is_number(float("inf"))
    assert not any(is_number(v) for v in (True, "1", None))
    with pytest.raises(ValueError, match="w must be a number, got True"):
        SamplingSettings(w=True)


def test_unknown_keys_are_named_with_their_section():
    @dataclasses.dataclass
    class Section:
        width: int = 1

    check_known_keys(Section, {"width": 2}, "unet.")
    with pytest.raises(ValueError, match=r"unknown Section key\(s\) \['unet.widht'\]; valid: \['width'\]"):
        check_known_keys(Section, {"widht": 2}, "unet.")
    with pytest.raises(TypeError, match="unet. must be a dict, got list"):
        check_known_keys(Section, [], "unet.")
    with pytest.raises(ValueError, match="unknown StageConfig key"):
        StageConfig.from_dict({"name": "x", "colour": 1})


def test_image_batch_check_names_the_expected_shape():
    x = torch.zeros(2, 3, 8, 8)
    check_image_batch(x, "x", channels=3, size=8, batch=2, square=True, floating=True)
    cases = [
        (torch.zeros(3, 8, 8), {}, r"^x must have shape B×C×H×W, got \(3, 8, 8\) torch.float32$"),
        ("img", {}, r"^x must have shape B×C×H×W, got str$"),
        (x, {"channels": 1}, r"^x must have shape B×1×H×W"),
        (x, {"size": 4, "batch": 3}, r"^x must have shape 3×C×4×4"),
        (torch.zeros(2, 3, 8, 6), {"square": True}, r"^x must have shape B×C×R×R"),
        (x.long(), {"floating": True}, r"^x must have shape B×C×H×W and a float dtype, got \(2, 3, 8, 8\) torch.int64"),
    ]
    for value, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            check_image_batch(value, "x", **kwargs)
