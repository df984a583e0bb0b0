"""The inputs of an evaluation from checkpoints: the cascade, the feature networks and the classifier that
judges class accuracy, and the start-up summary naming them. Every failure is a one-line CascadeConfigError
naming the option that fixes it.

Without a trained `classifier32` (no `<runs>/classifier32` and no --classifier), the judge of the shards
(`cascade.evaluation.judge.get_judge`: a small CNN trained once on the train split and cached in `<data>/judge/`)
is the classifier and offline feature network, at the chain's lowest resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cascade.checkpoint import load_stage, resolve_checkpoint
from cascade.config import SamplingSettings
from cascade.evaluation.features import ClassifierFeatures, FeatureNet, InceptionFeatures, PatchFeatures
from cascade.evaluation.judge import get_judge
from cascade.evaluation.sample_lists import check_data
from cascade.pipeline.cascade_pipeline import CascadeConfigError, CascadePipeline
from cascade.pipeline.chain import check_classifier

DEFAULT_CLASSIFIER = "classifier32"


def classifier_feature_net(path: str | Path, device: str | torch.device = "cpu") -> ClassifierFeatures:
    """A classifier checkpoint (e.g. runs/classifier32) as the offline feature network `<stage>-features`:
    penultimate features and logits at t = 0 on images resized to its resolution."""
    try:
        cfg, model, _ = load_stage(path, device=device)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise CascadeConfigError(f"classifier: {err}; train classifier32 or pass --classifier PATH") from None
    check_classifier(path, cfg)
    net = ClassifierFeatures(model, f"{cfg.name}-features", resolution=cfg.resolution)
    net.source = f"classifier checkpoint {resolve_checkpoint(path)}"
    return net


def judge_feature_net(data_root: str | Path, resolution: int, device: str | torch.device = "cpu",
                      log: Callable[[str], None] | None = None) -> ClassifierFeatures:
    """The judge of the shards at ``data_root`` (trained once on their train split, on the CPU, when not cached,
    which ``log`` is told) as the offline feature network and classifier on ``device``. CascadeConfigError (one line)
    when the shards cannot give one (no val split, no such resolution)."""
    try:
        judge = get_judge(data_root, resolution, log=log)
    except (FileNotFoundError, ValueError) as err:
        raise CascadeConfigError(f"no trained {DEFAULT_CLASSIFIER} and the judge of --data cannot stand in: {err}; "
                                 f"train {DEFAULT_CLASSIFIER} or pass --classifier PATH") from None
    if log is not None:
        how = "cached" if judge.from_cache else f"trained in {judge.train_seconds:.0f} s"
        log(f"features and class accuracy by {judge.features.name}, {judge.source()} ({how}, {judge.path})")
    return judge.features.to(device)


def load_for_evaluation(runs_dir: str | Path, stages: Sequence[str], *,
                        checkpoints: Mapping[str, str | Path] | None = None, classifier: str | Path | None = None,
                        inception_weights: str | Path | None = None, device: str | torch.device = "cpu",
                        precision: str = "auto", patch_features: bool = False, data_root: str | Path | None = None,
                        log: Callable[[str], None] | None = None,
                        ) -> tuple[CascadePipeline, list[FeatureNet], ClassifierFeatures]:
    """(pipeline, feature networks, classifier) from checkpoints; classifier default `<runs_dir>/classifier32`,
    or, when that folder does not exist and ``data_root`` is given, the judge of those shards
    (`judge_feature_net`; ``log`` hears which, one line). ``data_root`` is checked against the chain first
    (`check_data`: classes, resolutions). patch_features adds the classifier's `PatchFeatures`
    (patch FID). The Inception weights are checked first (cheap, and the likeliest mistake)."""
    inception = None if inception_weights is None else inception_feature_net(inception_weights, device)
    pipeline = CascadePipeline.from_runs(runs_dir, stages, checkpoints=checkpoints, device=device,
                                         precision=precision)
    if data_root is not None:
        check_data(data_root, pipeline)  # a bad --data is told before a judge is trained on it
    default = Path(runs_dir) / DEFAULT_CLASSIFIER
    if classifier is None and not default.exists() and data_root is not None:
        first = pipeline.stages[0].config
        if log is not None:
            log(f"no {default}: the judge of {data_root} stands in for {DEFAULT_CLASSIFIER}")
        clf = judge_feature_net(data_root, first.low_resolution or first.resolution, device, log=log)
    else:
        clf = classifier_feature_net(default if classifier is None else classifier, device)
    nets: list[FeatureNet] = ([inception] if inception is not None else []) + [clf]
    if patch_features:
        nets.append(PatchFeatures(clf, clf.resolution))
    return pipeline, nets, clf


def inception_feature_net(weights_path: str | Path, device: str | torch.device = "cpu") -> InceptionFeatures:
    """The standard FID Inception from a local weights file; a missing file or torch-fidelity is a
    CascadeConfigError (one line), never a download."""
    try:
        return InceptionFeatures(weights_path).to(device)
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise CascadeConfigError(str(err).replace("\n", " ")) from None


def settings_text(settings: SamplingSettings) -> str:
    """Every field of a stage's `SamplingSettings` as `name=value` pairs on one line."""
    return " ".join(f"{k}={v}" for k, v in settings.to_dict().items())


def summary_rows(pipeline: CascadePipeline, feature_nets: Sequence[FeatureNet], classifier: FeatureNet,
                 settings: Mapping[str, SamplingSettings], *, data_root: str | Path, samples: Any,
                 out: str | Path, extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """The rows of an evaluation's start-up summary (`cascade.summary.print_summary`): stages, checkpoint and step
    of each, feature networks and where they come from, the classifier of class accuracy, ``samples`` (the
    sample count per stage, as shown), each stage's sampling settings (every field), device, precision,
    ``extra`` rows and the output folder."""
    rows: list[tuple[str, Any]] = [("stages", ", ".join(s.name for s in pipeline.stages)), ("data", data_root)]
    rows += [(f"checkpoint {name}", f"{found['path']} (step {found['step']})")
             for name, found in pipeline.checkpoints().items()]
    rows += [(f"features {net.name}", net.source) for net in feature_nets]
    rows += [("class accuracy by", classifier.name), ("samples per stage", samples)]
    rows += [(f"sampling {name}", settings_text(value)) for name, value in settings.items()]
    rows += [("device", pipeline.device), ("precision", pipeline.precision), *extra, ("output", out)]
    return rows
