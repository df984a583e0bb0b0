"""The inputs of an evaluation from checkpoints: the cascade, the feature networks and the classifier that
judges class accuracy. Every failure is a one-line CascadeConfigError naming the option that fixes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from cascade.checkpoint import load_stage
from cascade.evaluation.features import ClassifierFeatures, FeatureNet, InceptionFeatures, PatchFeatures
from cascade.pipeline.cascade_pipeline import CascadeConfigError, CascadePipeline
from cascade.pipeline.chain import check_classifier


def classifier_feature_net(path: str | Path, device: str | torch.device = "cpu") -> ClassifierFeatures:
    """A classifier checkpoint (e.g. runs/classifier32) as the offline feature network `<stage>-features`:
    penultimate features and logits at t = 0 on images resized to its resolution."""
    try:
        cfg, model, _ = load_stage(path, device=device)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise CascadeConfigError(f"classifier: {err}; train classifier32 or pass --classifier PATH") from None
    check_classifier(path, cfg)
    return ClassifierFeatures(model, f"{cfg.name}-features", resolution=cfg.resolution)


def load_for_evaluation(runs_dir: str | Path, stages: Sequence[str], *,
                        checkpoints: Mapping[str, str | Path] | None = None, classifier: str | Path | None = None,
                        inception_weights: str | Path | None = None, device: str | torch.device = "cpu",
                        precision: str = "auto", patch_features: bool = False,
                        ) -> tuple[CascadePipeline, list[FeatureNet], ClassifierFeatures]:
    """(pipeline, feature networks, classifier) from checkpoints; classifier default `<runs_dir>/classifier32`.
    patch_features adds the classifier's `PatchFeatures` (patch FID). The Inception weights are checked first
    (cheap, and the likeliest mistake)."""
    inception = None if inception_weights is None else inception_feature_net(inception_weights, device)
    pipeline = CascadePipeline.from_runs(runs_dir, stages, checkpoints=checkpoints, device=device,
                                         precision=precision)
    clf = classifier_feature_net(Path(runs_dir) / "classifier32" if classifier is None else classifier, device)
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
