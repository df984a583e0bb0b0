"""The in-training quality proxy: a small, fixed, seeded sample set of the model being trained, scored by the
judge (`cascade.evaluation.judge`) against the real val split. A *proxy*: its few samples bias FD / KID, so
its numbers compare checkpoints of one run (or runs with the same count and steps), never a full evaluation.

- Base stages: ``count`` samples, balanced over the classes (class i gets count // K, the remainder one each
  to the first classes), sampled with the stage's own `SamplingSettings` (guidance included) over ``steps``
  respaced steps through `cascade.pipeline.stage_sampling.sample_stage`, the sampler of the grids and of the
  cascade. Scored by the judge at the stage's resolution: class accuracy (label = the class asked for),
  Fréchet distance (Heusel et al. 2017 eq. 6) and KID ± std (Bińkowski et al. 2018) in its features.
- SR stages: teacher-forced on the first ``count`` val inputs (`cascade.evaluation.val_inputs.read_val_inputs`,
  the inputs of the sample grids): consistency PSNR of the sample downsampled against its low-resolution input
  (`consistency_psnr`), detail ratio against the real high-resolution images (`detail_ratio`), and the
  judge's class accuracy, FD and KID at the stage's own resolution. The judge is fully convolutional with
  global pooling, so a judge trained at R² averages local texture statistics: it sees the detail the stage
  adds. Scoring the samples downsampled to the base judge's 32² would score their input instead (an SR
  sample downsampled is, by consistency, about its real low-resolution input).

Deterministic: the same weights give the same numbers (noise seeded per sample by ``seed``, the judge and KID
seeded); the global torch / numpy / python RNGs are never drawn from, and the model is left in the train / eval
mode it was in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cascade.checks import is_int_at_least
from cascade.config import StageConfig, StageKind
from cascade.data.shard_folder import read_dataset_info
from cascade.evaluation.judge import REFERENCE_SPLIT, get_judge, judge_reference, score
from cascade.evaluation.metrics import consistency_psnr, detail_energy, detail_ratio
from cascade.evaluation.val_inputs import read_val_inputs
from cascade.imageops import float_to_uint8, uint8_to_float
from cascade.pipeline.plan import monitor_settings, stage_timesteps
from cascade.pipeline.stage_sampling import sample_stage

__all__ = ["BASE_KEYS", "SR_KEYS", "QualityProxy", "balanced_labels"]

BASE_KEYS = ("proxy_class_accuracy", "proxy_fd", "proxy_kid", "proxy_kid_std", "proxy_count", "proxy_seconds")
SR_KEYS = ("proxy_consistency_db", "proxy_detail_ratio", *BASE_KEYS)


def balanced_labels(count: int, num_classes: int) -> torch.Tensor:
    """``count`` class indices grouped by class: class i appears count // K times, plus once more for the first
    count mod K classes (K = ``num_classes``)."""
    per_class = [count // num_classes + (1 if i < count % num_classes else 0) for i in range(num_classes)]
    return torch.arange(num_classes).repeat_interleave(torch.tensor(per_class))


class QualityProxy:
    """The quality proxy of one stage on the shards at ``data_root`` (see the module docstring).

    Classifier guidance (``settings.classifier``) and autoguidance (``settings.guide`` "auto") are not applied, as
    in the sample grids (`cascade.pipeline.plan.monitor_settings`): the proxy scores the diffusion model being
    trained, with its classifier-free guidance (none where the stage's default guide is "auto").

    ``count``: images per call (≥ 2; SR stages: at most the val split's size); ``seed``: the samples' noise and
    KID's subsets; ``device``: where the model samples (the judge scores on the CPU); ``steps``: respaced
    sampling steps (an int or a spacing string such as "ddim25", replacing the stage's own); ``log``: a
    callable taking one line (e.g. "training the judge ..."), or None.

    Construction reads the val split and gets the judge (`get_judge`: trained once and cached in `<data>/judge/`,
    which costs the most); ``setup_seconds`` says what it cost, ``judge_summary`` (one line) which judge it is,
    its accuracy on real val images (the ceiling of the class accuracy) and whether it was cached. Raises
    ValueError (one line naming the fix) when ``count`` is not an integer ≥ 2, the shards have no val split (the
    judge's reference; `tools/make_shards.py --val-fraction` writes one) or lack the stage's resolutions, or
    ``steps`` does not fit the stage's timesteps.
    """

    def __init__(self, data_root: str | Path, stage: StageConfig, *, count: int, seed: int, device: torch.device,
                 steps: int | str, log: Callable[[str], None] | None = None):
        started = time.perf_counter()
        if not is_int_at_least(count, 2):
            raise ValueError(f"quality proxy: count must be an integer >= 2 (FD and KID need two samples), "
                             f"got {count!r}")
        root = Path(data_root)
        info = read_dataset_info(root)
        if not info["shards"].get(REFERENCE_SPLIT):
            raise ValueError(f"quality proxy: {root} has no val split (the judge scores samples against it); "
                             "rewrite the shards with tools/make_shards.py --val-fraction 0.1, or switch the "
                             "proxy off (trainer.eval_every=0)")
        self.settings = monitor_settings(stage, steps)
        self.settings.check_for(stage)
        stage_timesteps(stage, self.settings)  # a spacing that does not fit: now
        self.stage, self.seed, self.device = stage, seed, torch.device(device)
        self.judge = get_judge(root, stage.resolution, log=log)
        self.reference = judge_reference(self.judge.features, root, stage.resolution)
        self.x_low = self.real_detail = None
        if stage.kind is StageKind.sr:
            inputs = read_val_inputs(root, info, stage, count, purpose="the quality proxy",
                                     switch_off="set trainer.eval_every=0", train_fallback=False)
            if len(inputs["y"]) < 2:
                raise ValueError(f"quality proxy: {root} has {len(inputs['y'])} readable val image; the proxy "
                                 "needs two; rewrite the shards with a larger --val-fraction")
            self.labels, self.x_low = inputs["y"], inputs["x_low"]
            self.real_detail = detail_energy(inputs["x"], stage.low_resolution)
        else:
            self.labels = balanced_labels(count, stage.num_classes)
        self.setup_seconds = time.perf_counter() - started
        judge = self.judge
        how = "cached" if judge.from_cache else f"trained in {judge.train_seconds:.0f} s"
        self.judge_summary = (f"{judge.features.name}: {100 * judge.val_accuracy:.1f}% on real val images at "
                              f"{judge.resolution}² ({how}, {judge.path.parent}); proxy of {len(self.labels)} "
                              f"samples, {self.settings.sampler} {self.settings.steps} steps")

    @property
    def count(self) -> int:
        """Images scored per call."""
        return len(self.labels)

    def __call__(self, model: torch.nn.Module, diffusion) -> dict[str, float]:
        """Sample and score ``model`` (``diffusion``: the stage's, on its training timesteps): `BASE_KEYS` for a
        base stage, `SR_KEYS` for an SR stage; proxy_class_accuracy in [0, 1], proxy_fd ≥ 0, proxy_kid (unbiased:
        may be slightly negative) ± proxy_kid_std, proxy_consistency_db in dB (inf: identical), proxy_detail_ratio
        ≥ 0 (1: real images' detail), proxy_count the images scored, proxy_seconds this call's time. Samples
        that are not finite (a diverged model) give NaN for every metric instead of an error."""
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                images = sample_stage(model, diffusion, self.stage, self.settings, self.labels, self.x_low,
                                      seed=self.seed, device=self.device)
        finally:
            model.train(was_training)
        keys = SR_KEYS if self.x_low is not None else BASE_KEYS
        if not torch.isfinite(images).all():
            result = dict.fromkeys(keys, math.nan)
        else:
            images = uint8_to_float(float_to_uint8(images))  # scored as saved PNGs would be
            judged = score(self.judge, images, self.labels, seed=self.seed, reference=self.reference)
            result = {"proxy_class_accuracy": judged["class_accuracy"], "proxy_fd": judged["fd"],
                      "proxy_kid": judged["kid_mean"], "proxy_kid_std": judged["kid_std"]}
            if self.x_low is not None:
                result["proxy_consistency_db"] = consistency_psnr(images, self.x_low)[1]
                result["proxy_detail_ratio"] = detail_ratio(images, self.real_detail, self.stage.low_resolution)
        result["proxy_count"] = float(len(images))
        result["proxy_seconds"] = time.perf_counter() - started
        return {key: float(result[key]) for key in keys}
