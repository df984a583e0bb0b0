"""The demo's budgets and command line without running the demo: distillation's share of the training minutes."""

import dataclasses

import pytest
from conftest import load_tool

from cascade.harness import demo


def test_distilled_default_trains_for_the_same_minutes():
    plain, distilled = demo.DEFAULT, demo.DEFAULT_DISTILLED
    assert distilled.distilled == ("base32", "sr64")
    assert sum(distilled.train_seconds.values()) + sum(distilled.distill_seconds.values()) == \
        sum(plain.train_seconds.values())
    for name in distilled.distilled:
        assert distilled.train_seconds[name] + distilled.distill_seconds[name] == plain.train_seconds[name]
        steps, seconds = distilled.distill_budget(name)
        assert seconds == distilled.distill_seconds[name] and steps >= 1
    assert dataclasses.replace(distilled, train_seconds=plain.train_seconds, distill_seconds=None,
                               distill_steps=None) == plain
    assert demo.DEFAULT.distilled == () and demo.QUICK.distilled == ()


def test_quick_distillation_is_step_bounded():
    quick = demo.QUICK_DISTILLED
    assert quick.distilled == ("base32", "sr64") and quick.distill_seconds is None
    assert quick.distill_budget("base32") == (quick.distill_steps["base32"], None)
    assert dataclasses.replace(quick, distill_steps=None) == demo.QUICK


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"distill_steps": {"classifier32": 3}}, "not a generator of the chain"),
    ({"distill_seconds": {"base32": 0}}, r"distill_seconds\[base32\] must be > 0"),
])
def test_bad_distillation_budgets_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(demo.QUICK, **kwargs)


def test_distillation_cannot_take_all_of_a_stages_training():
    with pytest.raises(ValueError, match="leaves base32 no training seconds"):
        demo.with_distillation(demo.DEFAULT, seconds={"base32": demo.DEFAULT.train_seconds["base32"]})


def test_command_line_picks_the_budget(monkeypatch, tmp_path):
    tool = load_tool("demo")
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda out, budget, configs, **kw: calls.append((out, budget)) or
                        type("R", (), {"report_html": "r.html", "report_md": "r.md"})())
    monkeypatch.chdir(tmp_path)
    for argv, budget, out in [([], demo.DEFAULT, "demo_out"),
                              (["--distill"], demo.DEFAULT_DISTILLED, "demo_out_distilled"),
                              (["--quick", "--distill"], demo.QUICK_DISTILLED, "demo_out_quick_distilled"),
                              (["--quick", "--no-distill"], demo.QUICK, "demo_out_quick")]:
        assert tool.main(argv) == 0
        assert calls[-1] == (out, budget), argv
    assert tool.DISTILL_BY_DEFAULT is False  # the default (no flag) stays the plain demo until measured
    assert demo.demo_budget(quick=False, distill=True) is demo.DEFAULT_DISTILLED
