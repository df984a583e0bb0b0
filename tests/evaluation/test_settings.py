"""MetricSettings: every bad value is rejected once, in the constructor, with one line naming the option; the
command line turns them into one-line CascadeConfigErrors with the same text."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from cascade.cli import add_metric_arguments, metric_settings
from cascade.evaluation.cas import CASSettings
from cascade.evaluation.settings import DEFAULT_METRICS, MetricSettings
from cascade.pipeline.cascade_pipeline import CascadeConfigError


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"pr_k": -1}, "--pr-k must be >= 0 (0 leaves precision / recall out), got -1"),
        ({"pr_k": 2.5}, "--pr-k must be >= 0 (0 leaves precision / recall out), got 2.5"),
        ({"pr_k": True}, "--pr-k must be >= 0 (0 leaves precision / recall out), got True"),
        ({"bootstrap": 1}, "--bootstrap must be 0 (off) or >= 2 resamples, got 1"),
        ({"bootstrap": -4}, "--bootstrap must be 0 (off) or >= 2 resamples, got -4"),
        ({"bootstrap": True}, "--bootstrap must be 0 (off) or >= 2 resamples, got True"),
        ({"cas_per_class": 0}, "--cas: needs at least 1 generated image per class, got 0"),
        ({"cas_per_class": "3"}, "--cas: needs at least 1 generated image per class, got '3'"),
        ({"cas": {"steps": 3}}, "cas must be a CASSettings, got dict"),
        ({"memorisation": 1}, "metrics.memorisation must be bool, got 1"),
        ({"baselines": "yes"}, "metrics.baselines must be bool, got 'yes'"),
    ],
)
def test_each_bad_value_is_one_line_naming_the_option(changes, expected):
    with pytest.raises(ValueError) as info:
        MetricSettings(**changes)
    assert str(info.value) == expected and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="must be|needs"):
        dataclasses.replace(DEFAULT_METRICS, **changes)  # a changed copy is checked the same way


def test_defaults_and_what_they_mean():
    assert DEFAULT_METRICS.precision_recall_k == 3 and MetricSettings(pr_k=0).precision_recall_k is None
    assert DEFAULT_METRICS.cas == CASSettings() and DEFAULT_METRICS.cas_per_class is None
    MetricSettings(pr_k=1, bootstrap=2, cas_per_class=1, memorisation=True, baselines=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_METRICS.pr_k = 5  # type: ignore[misc]


def test_precision_recall_need_more_samples_than_k():
    MetricSettings(pr_k=3).check_sample_count(4)
    MetricSettings(pr_k=0).check_sample_count(2)
    with pytest.raises(CascadeConfigError, match=r"^--pr-k: precision/recall with k=4 needs more than 4 samples "
                                                 r"per stage, got 4; raise --num-samples or lower --pr-k$"):
        MetricSettings(pr_k=4).check_sample_count(4)


def _args(*argv: str, memorisation: bool = True) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_metric_arguments(parser, memorisation=memorisation)
    return parser.parse_args(list(argv))


def test_the_command_line_builds_one_settings_object():
    settings = metric_settings(_args("--pr-k", "0", "--bootstrap", "20", "--cas", "5", "--cas-steps", "7",
                                     "--memorisation"))
    assert settings == MetricSettings(pr_k=0, bootstrap=20, cas_per_class=5, cas=CASSettings(steps=7),
                                      memorisation=True)
    assert metric_settings(_args(memorisation=False)) == DEFAULT_METRICS  # sweep.py: no --memorisation


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--pr-k", "-1"], "--pr-k must be >= 0 (0 leaves precision / recall out), got -1"),
        (["--bootstrap", "1"], "--bootstrap must be 0 (off) or >= 2 resamples, got 1"),
        (["--cas", "0"], "--cas: needs at least 1 generated image per class, got 0"),
        (["--cas-steps", "0"], "--cas-steps: CAS steps must be an integer >= 1, got 0"),
    ],
)
def test_command_line_errors_are_config_errors_with_the_same_line(argv, expected):
    with pytest.raises(CascadeConfigError) as info:
        metric_settings(_args(*argv))
    assert str(info.value) == expected
