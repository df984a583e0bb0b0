"""Command-line pieces shared by the tools: `STAGE=value` lists, class lists, `--ckpt` pairs, the sampler
options, and the one-line error convention (a line `<prog>: error: <message>` on stderr, exit code 2).

Every malformed value raises `CascadeConfigError` with a one-line message naming the option and the fix.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from cascade.diffusion.samplers import SAMPLERS
from cascade.pipeline.cascade_pipeline import DEFAULT_CHAIN, CascadeConfigError

T = TypeVar("T")

# A comma starts a new item only where a `STAGE=` follows, so a value may itself hold commas
# (`--steps base32=10,5,sr64=ddim4` → base32: "10,5", sr64: "ddim4").
_ITEM_SPLIT = re.compile(r",(?=\s*[A-Za-z_][\w-]*\s*=)")
_STAGE_NAME = re.compile(r"^[A-Za-z_][\w-]*$")


def parse_stage_values(text: str, cast: Callable[[str], T], option: str) -> T | dict[str, T]:
    """Parse `VALUE` (one value for every stage) or `STAGE=VALUE[,STAGE=VALUE...]` (per stage)."""
    text = text.strip()
    example = f"{option} VALUE or {option} base32=VALUE,sr64=VALUE"
    if not text:
        raise CascadeConfigError(f"{option}: empty value; expected {example}")
    if "=" not in text:
        return _cast(cast, text, option, example)
    values: dict[str, T] = {}
    for item in _ITEM_SPLIT.split(text):
        stage, sep, raw = item.partition("=")
        stage, raw = stage.strip(), raw.strip()
        if not sep or not _STAGE_NAME.match(stage) or not raw:
            raise CascadeConfigError(f"{option}: malformed item {item!r} in {text!r}; expected {example}")
        if stage in values:
            raise CascadeConfigError(f"{option}: stage {stage} is given twice in {text!r}; give it once")
        values[stage] = _cast(cast, raw, option, example)
    return values


def _cast(cast: Callable[[str], T], raw: str, option: str, example: str) -> T:
    try:
        return cast(raw)
    except ValueError as err:
        raise CascadeConfigError(f"{option}: bad value {raw!r} ({err}); expected {example}") from None


def steps_value(raw: str) -> int | str:
    """A respacing value: an integer step count, or a `space_timesteps` string ("ddim25", "10,5")."""
    return int(raw) if re.fullmatch(r"[+-]?\d+", raw) else raw


def show_progress() -> bool:
    """Whether a tool draws progress bars: only when stderr is a terminal (in a log file or a pipe, tqdm's carriage
    returns would make one endless line)."""
    return sys.stderr.isatty()


def default_device() -> str:
    """cuda when a GPU is available, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_classes(text: str) -> list[int]:
    """`1,7` → [1, 7]."""
    try:
        classes = [int(c) for c in text.split(",")]
    except ValueError:
        raise CascadeConfigError(
            f"--classes: malformed {text!r}; expected comma-separated class indices, e.g. --classes 1,7"
        ) from None
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise CascadeConfigError(
            f"--classes: class {repeated[0]} is listed twice; list each class once and use --num-per-class N"
        )
    return classes


def parse_stage_list(text: str, valid: Iterable[str], option: str = "--stages") -> list[str]:
    """`base32,sr64` → ["base32", "sr64"]; unknown or repeated names are errors."""
    return parse_choices(text, valid, option, what="stage")


def parse_choices(text: str, valid: Iterable[str], option: str, what: str) -> list[str]:
    """`a,b` → ["a", "b"], each one of `valid`; unknown or repeated names are errors."""
    valid = list(valid)
    names = [n.strip() for n in text.split(",")]
    for name in names:
        if name not in valid:
            raise CascadeConfigError(f"{option}: unknown {what} {name!r}; valid {what}s: {', '.join(valid)}")
    if len(set(names)) != len(names):
        raise CascadeConfigError(f"{option}: a {what} is named twice in {text!r}; name each once")
    return names


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``low``; anything else is argparse's one-line error naming the option."""

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {raw!r}")
        return value

    return parse


def fraction_below_one(raw: str) -> float:
    """argparse type: a number in [0, 1); anything else is argparse's one-line error naming the option."""
    try:
        value = float(raw)
    except ValueError:
        value = None
    if value is None or not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {raw!r}")
    return value


def float_list(raw: str) -> list[float]:
    """`0,1,3` → [0.0, 1.0, 3.0] (a cast for `parse_stage_values`: grids of values to sweep)."""
    values = [float(v) for v in raw.split(",")]
    if len(set(values)) != len(values):
        raise ValueError("a value is repeated")
    return values


def parse_ckpt_pairs(items: Iterable[str], option: str = "--ckpt") -> dict[str, str]:
    """Repeated `STAGE=PATH` → {stage: path}."""
    pairs: dict[str, str] = {}
    for item in items:
        stage, sep, path = item.partition("=")
        stage, path = stage.strip(), path.strip()
        if not sep or not _STAGE_NAME.match(stage) or not path:
            raise CascadeConfigError(f"{option}: malformed {item!r}; expected {option} STAGE=PATH, e.g. "
                                     f"{option} sr64=runs/sr64")
        if stage in pairs:
            raise CascadeConfigError(f"{option}: stage {stage} is given twice; give one checkpoint per stage")
        pairs[stage] = path
    return pairs


# ------------------------------------------------------------------------------------------------------
# Parsers and options shared by the tools


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line `<prog>: error: <message> (see --help)`, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def report_error(prog: str, err: Exception) -> int:
    """Print a bad-input error as one line on stderr; return the exit code 2."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 2


# The command-line option of each `SamplingSettings` field the tools set (the start-up summary marks values with it).
SAMPLER_OPTIONS = {"w": "--w", "steps": "--steps", "sampler": "--sampler", "eta": "--eta", "aug_level": "--aug-level",
                   "truncate": "--truncate", "classifier": "--classifier", "classifier_scale": "--classifier-scale",
                   "guide": "--guide", "guide_checkpoint": "--guide-ckpt"}


def add_sampler_arguments(p: argparse.ArgumentParser, *, grid: bool = False, w_first_stage: bool = False) -> None:
    """The sampling-settings options (`SamplingSettings`); each left out keeps every stage's own default.

    --w, --steps, --sampler, --aug-level: one value (for every stage it applies to) or STAGE=VALUE,... per
    stage; --eta (DDIM's η) one value for every DDIM stage; --truncate / --no-truncate for every SR stage.
    w_first_stage: a bare --w W guides the chain's first stage only (`sampler_overrides` with bare_w_stage); the
    other stages keep their own w unless named (sample_cascade.py). Otherwise a bare W is every stage's (the
    evaluation tools, which judge each stage on its own).
    grid: --w and --aug-level take lists of values to sweep (`0,1,3` or `base32=0,1,sr64=0,2`), no --truncate.
    --guide cfg|auto (or STAGE=GUIDE,...) and --guide-ckpt STAGE=PATH (repeatable): what w guides away from; a bare
    --guide auto applies to the stages given a --guide-ckpt (`sampler_overrides`).
    """
    if grid:
        p.add_argument("--w", default="0,1,3", metavar="[STAGE=]W,W,...",
                       help="guidance weights to try: W,W,... or STAGE=W,W,...,STAGE=... (default 0,1,3)")
        p.add_argument("--aug-level", default=None, metavar="[STAGE=]S,S,...",
                       help="augmentation levels s in [0, 1] to try for SR stages (default: each stage's own)")
    else:
        w_help = ("classifier-free guidance weight w >= 0: W guides the chain's first stage (the base stage) only, "
                  "the other stages keep their own w unless named: STAGE=W,..., e.g. --w base32=3,sr64=2"
                  if w_first_stage else "classifier-free guidance weight w >= 0: W (every stage) or STAGE=W,...")
        p.add_argument("--w", default=None, metavar="[STAGE=]W", help=f"{w_help} (default: each stage's own)")
        p.add_argument("--aug-level", default=None, metavar="[STAGE=]S",
                       help="conditioning augmentation level s in [0, 1]: S (every SR stage) or STAGE=S,... "
                            "(default: each stage's own)")
    p.add_argument("--steps", default=None,
                   help="respaced steps: N, 'ddimN' or sections '10,5' (every stage), or STAGE=...,... "
                        "(default: each stage's own)")
    p.add_argument("--sampler", default=None,
                   help=f"one of {', '.join(SAMPLERS)} (every stage), or STAGE=SAMPLER,... (default: each stage's "
                        "own)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta, every DDIM stage (default: each stage's own)")
    p.add_argument("--guide", default=None, metavar="[STAGE=]cfg|auto",
                   help="what w guides away from: cfg (the null class: classifier-free guidance) or auto "
                        "(autoguidance by a weaker checkpoint of the same stage, --guide-ckpt; w > 0 gives "
                        "(1+w)*model - w*guide); a bare auto applies to the stages given a --guide-ckpt "
                        "(default: each stage's own)")
    p.add_argument("--guide-ckpt", action="append", default=[], metavar="STAGE=PATH",
                   help="autoguidance guide of one stage: a checkpoint of that stage (an earlier one of its run, a "
                        "post-hoc EMA or a smaller run; run, checkpoints or step folder); repeatable")
    if not grid:
        p.add_argument("--truncate", action=argparse.BooleanOptionalAction, default=None,
                       help="truncated conditioning augmentation between stages (--no-truncate: off; default: each "
                            "stage's own)")


def load_evaluation_inputs(args: argparse.Namespace, device: Any, log: Callable[[str], None] | None = None):
    """(pipeline, feature networks, classifier) from the options `add_evaluation_arguments` defines; without
    --classifier and `<runs>/classifier32`, the judge of --data (``log`` hears which, and when it is trained)."""
    from cascade.evaluation.inputs import load_for_evaluation

    chain = parse_stage_list(args.stages, DEFAULT_CHAIN)
    return load_for_evaluation(args.runs, chain, checkpoints=parse_ckpt_pairs(args.ckpt), classifier=args.classifier,
                               inception_weights=args.inception_weights, device=args.device or device,
                               precision=args.precision, patch_features=args.patch_fid, data_root=args.data,
                               log=log)


def sampler_overrides(args: argparse.Namespace, *, grid: bool = False,
                      bare_w_stage: str | None = None) -> dict[str, Any]:
    """The sampling options given on the command line as `CascadePipeline.settings` overrides (options left
    out are absent: the stages keep their own defaults). grid: --w and --aug-level are lists to sweep. A bare
    --guide auto becomes {stage: "auto"} for the stages --guide-ckpt names (CascadeConfigError without one).
    bare_w_stage: the stage a bare --w W guides ({bare_w_stage: W}; sample_cascade.py: the chain's first); None:
    a bare value is every stage's."""
    cast = float_list if grid else float
    guide_ckpt = parse_ckpt_pairs(args.guide_ckpt, "--guide-ckpt") or None
    guide = None if args.guide is None else parse_stage_values(args.guide, str, "--guide")
    if guide == "auto":  # a bare auto: the stages given a guide checkpoint
        if guide_ckpt is None:
            raise CascadeConfigError("--guide auto needs --guide-ckpt STAGE=PATH, a checkpoint of each stage to "
                                     "guide (e.g. an earlier checkpoint of its run)")
        guide = dict.fromkeys(guide_ckpt, "auto")
    w = None if args.w is None else parse_stage_values(args.w, cast, "--w")
    if bare_w_stage is not None and w is not None and not isinstance(w, dict):
        w = {bare_w_stage: w}
    parsed = {
        "w": w,
        "steps": None if args.steps is None else parse_stage_values(args.steps, steps_value, "--steps"),
        "sampler": None if args.sampler is None else parse_stage_values(args.sampler, str, "--sampler"),
        "eta": args.eta,
        "aug_level": None if args.aug_level is None else parse_stage_values(args.aug_level, cast, "--aug-level"),
        "truncate": None if grid else args.truncate,
        "guide": guide,
        "guide_checkpoint": guide_ckpt,
    }
    return {key: value for key, value in parsed.items() if value is not None}


def add_evaluation_arguments(p: argparse.ArgumentParser, default_stages: str) -> None:
    """Options of eval_fid.py and sweep.py: checkpoints, data, feature networks, samples, seed, device."""
    p.add_argument("--data", required=True, metavar="DIR", help="shard folder with a val split (make_shards.py)")
    p.add_argument("--stats-dir", default=None, metavar="DIR",
                   help="folder caching the real-image statistics (default <data>/fid_stats, or <out>/fid_stats "
                        "when the data folder is read-only)")
    p.add_argument("--stages", default=default_stages, help=f"the chain to evaluate (default {default_stages})")
    p.add_argument("--runs", default="runs", help="runs folder holding <stage>/ run dirs (default runs)")
    p.add_argument("--ckpt", action="append", default=[], metavar="STAGE=PATH",
                   help="checkpoint of one stage (run dir, checkpoints dir or step dir); repeatable")
    p.add_argument("--classifier", default=None, metavar="PATH",
                   help="classifier trained on real data: class accuracy and the offline feature network "
                        "(default <runs>/classifier32; without one, the judge of --data, trained once and cached "
                        "in <data>/judge/)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="local pt_inception-2015-12-05-6726825d.pth: adds the standard FID Inception (fid extra)")
    p.add_argument("--patch-fid", action="store_true",
                   help="also FID/KID on full-resolution patches (the classifier's input size) of every stage: "
                        "sees the detail SR stages add")
    p.add_argument("--num-samples", type=int_at_least(2), default=None,
                   help="images per stage (and mode / setting); default: one per val image")
    p.add_argument("--batch-size", type=int_at_least(1), default=64, help="samples per batch (default 64)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="same seed, same samples (default 0)")
    p.add_argument("--device", default=None,
                   help="torch device (default: accelerate's device of this process, e.g. cuda:0 or cpu)")
    p.add_argument("--precision", default="auto",
                   help="one of auto, fp32, bf16 (default auto: bf16 where the device computes it natively, else fp32)")


def add_metric_arguments(p: argparse.ArgumentParser, *, memorisation: bool = True) -> None:
    """Options of the optional metrics (eval_fid.py, sweep.py): precision / recall's k, FID's bootstrap
    interval, CAS, whether a damaged val split may be the reference, and (memorisation=True) the memorisation
    check."""
    p.add_argument("--pr-k", type=int, default=3, metavar="K",
                   help="k of the k-NN manifolds of precision / recall (default 3; 0 leaves them out)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="B",
                   help="95%% confidence interval of FID from B resamplings of the generated set (default off)")
    p.add_argument("--cas", type=int, default=None, metavar="N",
                   help="Classification Accuracy Score: train a small classifier on N generated images per class "
                        "of each stage, test it on the real val images; next to the same classifier trained on N "
                        "real training images per class (the ceiling)")
    p.add_argument("--cas-steps", type=int, default=300, metavar="STEPS",
                   help="training steps of each CAS classifier (default 300)")
    p.add_argument("--allow-damaged-val", action="store_true",
                   help="evaluate against the readable val images even when fewer than half of them are readable "
                        "(the results record how many were read and skipped)")
    if memorisation:
        p.add_argument("--memorisation", action="store_true",
                       help="nearest training image of every sample (features and 32² pixels); saves the closest "
                            "pairs as memorisation-<stage>.png")


def statistics_folder(args: argparse.Namespace, prog: str, main_process: bool = True) -> Path:
    """The folder caching the real-image statistics of eval_fid.py and sweep.py, chosen before any sampling
    (`cascade.evaluation.reference_stats.stats_folder`: --stats-dir, else <--data>/fid_stats, else
    <--out>/fid_stats with a note on stderr when the data folder is read-only); OutputNotWritable (one line)
    when --stats-dir cannot be written."""
    from cascade.evaluation.reference_stats import stats_folder

    folder, fallback = stats_folder(args.data, args.stats_dir, args.out)
    if fallback and main_process:
        print(f"{prog}: note: {args.data} is read-only; the real-image statistics are cached in "
              f"{folder} (--stats-dir DIR to choose)", file=sys.stderr)
    return folder


def metric_settings(args: argparse.Namespace) -> Any:
    """The `cascade.evaluation.settings.MetricSettings` of the options `add_metric_arguments` defines (and
    eval_fid.py's --baselines); a bad value is a one-line CascadeConfigError naming the option."""
    import dataclasses

    from cascade.evaluation.cas import CASSettings
    from cascade.evaluation.settings import MetricSettings

    try:
        settings = MetricSettings(pr_k=args.pr_k, bootstrap=args.bootstrap, cas_per_class=args.cas,
                                  memorisation=getattr(args, "memorisation", False),
                                  baselines=getattr(args, "baselines", False),
                                  allow_damaged_val=getattr(args, "allow_damaged_val", False))
    except ValueError as err:
        raise CascadeConfigError(str(err)) from None
    try:
        return dataclasses.replace(settings, cas=CASSettings(steps=args.cas_steps))
    except ValueError as err:
        raise CascadeConfigError(f"--cas-steps: {err}") from None
