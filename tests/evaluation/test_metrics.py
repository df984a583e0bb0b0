import json
import math
import os
import sys

import pytest
import torch
from torch import nn

from cascade.evaluation.features import ClassifierFeatures, InceptionFeatures, PatchFeatures
from cascade.evaluation.metrics import (
    best_setting,
    class_accuracy,
    compute_fid_kid,
    consistency_psnr,
    detail_ratio,
    fine_detail_rms,
)
from cascade.evaluation.plots import plot_sweep
from cascade.evaluation.reference_stats import (
    cached_reference_stats,
    compute_reference_stats,
    reference_stats_path,
    shard_fingerprint,
)
from cascade.evaluation.report import best_flags, write_report
from cascade.imageops import downsample, upsample

RES = 16


def toy_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 12),
        nn.Tanh(),
        nn.Linear(12, 4),
    )


def toy_net(seed: int = 0, name: str = "toy") -> ClassifierFeatures:
    return ClassifierFeatures(toy_classifier(seed), name, resolution=RES, noise_aware=False)


def images(n: int, seed: int, shift: float = 0.0, res: int = RES) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, res, res, generator=g) * 1.6 - 0.8 + shift).clamp(-1, 1)


@pytest.fixture(scope="module")
def net():
    return toy_net()


def test_classifier_features_interface(net):
    assert (net.num_features, net.num_classes, net.head) == (12, 4, "6")  # input of the last Linear
    x = images(5, 0, res=32)  # any resolution: resized to the classifier's
    features, logits = net.features_and_logits(x)
    assert features.shape == (5, 12) and logits.shape == (5, 4)
    assert torch.equal(net(x), features)
    assert net.fingerprint() == toy_net().fingerprint() != toy_net(seed=1).fingerprint()
    with pytest.raises(ValueError, match="name"):
        ClassifierFeatures(toy_classifier(), "bad name/", resolution=RES, noise_aware=False)
    with pytest.raises(ValueError, match="B×3×H×W"):
        net(torch.zeros(2, 1, RES, RES))


def test_patch_features_tile_full_resolution_crops(net):
    patch_net = PatchFeatures(net, RES)
    assert patch_net.name == "toy-patch16" and not patch_net.has_logits
    assert patch_net.fingerprint() != PatchFeatures(net, RES, max_per_side=2).fingerprint()
    x = images(2, 3, res=64)  # 64 // 16 = 4 per side: a 4×4 grid of non-overlapping tiles
    crops = patch_net.patches(x)
    assert crops.shape == (2 * 16, 3, RES, RES)
    assert torch.equal(crops[0], x[0, :, :16, :16]) and torch.equal(crops[5], x[0, :, 16:32, 16:32])
    assert torch.equal(crops[16 + 15], x[1, :, 48:, 48:])
    assert torch.equal(patch_net(x), net(crops))  # features of the crops, not of the resized image
    wide = images(1, 4, res=128)  # 8 tiles fit per side, at most 4 are taken: evenly spaced, ends included
    wide_crops = PatchFeatures(net, RES).patches(wide)
    assert wide_crops.shape[0] == 16 and torch.equal(wide_crops[-1], wide[0, :, 112:, 112:])
    same = images(3, 5)  # images of the patch size: one patch, the inner network's own features
    torch.testing.assert_close(patch_net(same), net(same))
    # detail the whole-image features cannot see: fine noise survives at patch level only
    smooth = images(8, 6, res=64)
    noisy = (smooth + 0.3 * torch.randn(smooth.shape, generator=torch.Generator().manual_seed(7))).clamp(-1, 1)
    whole_fid = compute_fid_kid(smooth, noisy, net, kid_subset_size=4)["fid"]
    patch_fid = compute_fid_kid(smooth, noisy, patch_net, kid_subset_size=4)
    assert patch_fid["num_fake"] == 8 * 16 and patch_fid["fid"] > whole_fid
    with pytest.raises(ValueError, match="needs square images of at least 16"):
        patch_net(images(1, 0, res=8))
    with pytest.raises(ValueError, match="patch must be a positive int"):
        PatchFeatures(net, 0)


def test_fid_kid_self_near_zero_and_shift_larger(net):
    real = images(96, 0)
    same = compute_fid_kid(real, real, net, kid_subsets=20, seed=0)
    shifted = compute_fid_kid(real, images(96, 1, shift=0.4), net, kid_subsets=20, seed=0)
    assert same["feature_net"] == "toy" and same["num_real"] == same["num_fake"] == 96
    assert abs(same["fid"]) < 1e-6 < 1e-3 * shifted["fid"]
    assert abs(same["kid_mean"]) < 0.05 * shifted["kid_mean"]
    assert same["is_mean"] > 1.0 - 1e-4 and "is_std" in same  # the net has logits → Inception Score
    with pytest.raises(ValueError, match="at least 2"):
        compute_fid_kid(real, real[:1], net)


def test_kid_std_reflects_the_generated_set_at_small_n(net):
    """With few samples the default KID subsets are at most half the generated set, so they differ and the std
    is not 0 (with subsets of the whole set every subset would hold every sample)."""
    result = compute_fid_kid(images(64, 0), images(12, 1, shift=0.3), net, kid_subsets=20, seed=0)
    assert result["kid_std"] > 0


def test_cached_stats_match_images_and_reject_other_net(net):
    real, fake = images(64, 0), images(64, 2, shift=0.2)
    stats = compute_reference_stats(real, net, kid_max_features=None)
    from_stats = compute_fid_kid(stats, fake, net, kid_subsets=10)
    direct = compute_fid_kid(real, fake, net, kid_subsets=10)
    assert from_stats["fid"] == pytest.approx(direct["fid"], rel=1e-6)
    assert from_stats["kid_mean"] == pytest.approx(direct["kid_mean"], rel=1e-6)
    capped = compute_reference_stats(real, net, kid_max_features=10)
    assert capped.kid_features.shape == (10, 12) and capped.num_samples == 64
    real_features = net(real)
    assert all((real_features - row).abs().amax(1).min() < 1e-6 for row in capped.kid_features)
    with pytest.raises(ValueError, match="different|not with"):
        compute_fid_kid(stats, fake, toy_net(seed=3))


def test_reference_stats_cache_reuse_and_invalidation(tmp_path, net):
    (tmp_path / "dataset.json").write_text("{}")
    shard = tmp_path / "val-000000.tar"
    shard.write_bytes(b"x" * 10)
    calls = []

    def batches():
        calls.append(1)
        return [images(20, 0), images(20, 1)]

    first = cached_reference_stats(tmp_path, "val", RES, net, batches, kid_max_features=30)
    path = reference_stats_path(tmp_path, "val", RES, "toy")
    assert path == tmp_path / "fid_stats" / "val-16-toy.safetensors" and path.is_file()
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["key"]["data_fingerprint"] == shard_fingerprint(tmp_path, "val")
    assert sidecar["num_samples"] == 40 and sidecar["num_kid_features"] == 30
    second = cached_reference_stats(tmp_path, "val", RES, net, batches, kid_max_features=30)
    assert len(calls) == 1  # reused: the image source was not touched
    assert torch.equal(first.cov, second.cov) and torch.equal(first.kid_features, second.kid_features)

    elsewhere = tmp_path / "out" / "fid_stats"  # --stats-dir (e.g. the data folder became read-only)
    third = cached_reference_stats(tmp_path, "val", RES, net, batches, kid_max_features=30, stats_dir=elsewhere)
    assert len(calls) == 1 and torch.equal(first.cov, third.cov)  # read from beside the data, not recomputed
    assert not elsewhere.exists()

    shard.write_bytes(b"x" * 11)  # data changed → recomputed
    cached_reference_stats(tmp_path, "val", RES, net, batches, kid_max_features=30)
    assert len(calls) == 2
    cached_reference_stats(tmp_path, "val", RES, toy_net(seed=5), batches, kid_max_features=30)
    assert len(calls) == 3  # feature network weights changed → recomputed
    cached_reference_stats(tmp_path, "val", RES, net, batches, data_fingerprint="other", kid_max_features=30)
    assert len(calls) == 4
    with pytest.raises(ValueError, match="16×16"):
        cached_reference_stats(tmp_path, "val", RES, net, [images(4, 0, res=32)], data_fingerprint="x")
    with pytest.raises(FileNotFoundError, match="train"):
        shard_fingerprint(tmp_path, "train")


def test_inception_missing_weights_and_missing_package(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"--inception-weights PATH.*pip install \.\[fid\]"):
        InceptionFeatures(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        InceptionFeatures(None)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install \.\[fid\]"):
        InceptionFeatures(weights)


def test_consistency_psnr():
    sr = images(4, 0, res=32)
    exact_psnr, exact_mean = consistency_psnr(sr, downsample(sr, 8))
    assert exact_psnr.shape == (4,) and exact_mean >= 40
    noisy = sr + 0.2 * torch.randn(sr.shape, generator=torch.Generator().manual_seed(0))
    low = downsample(sr, 8) + 0.05 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    _, slightly_off = consistency_psnr(sr, low)
    _, very_off = consistency_psnr(noisy, downsample(sr, 8) + 0.3)
    assert 20 < slightly_off < 40 and very_off < slightly_off
    with pytest.raises(ValueError):
        consistency_psnr(sr, downsample(sr, 8)[:2])


def test_detail_ratio_tells_smooth_upsampling_real_detail_and_noise_apart():
    real = images(6, 8, res=64)
    assert detail_ratio(real, real, 32) == pytest.approx(1.0)
    smooth = upsample(downsample(real, 32), 64)  # no detail above 32² left (up to resampling round trips)
    assert detail_ratio(smooth, real, 32) < 0.2
    noisy = real + 0.5 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    assert detail_ratio(noisy, real, 32) > 1.2
    per_image = fine_detail_rms(real, 32)
    assert per_image.shape == (6,) and (per_image > 0).all()
    with pytest.raises(ValueError, match="low_resolution must be in"):
        fine_detail_rms(real, 64)
    with pytest.raises(ValueError, match="no detail above low_resolution"):
        detail_ratio(real, torch.zeros(2, 3, 64, 64), 32)


def test_class_accuracy_toy():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    x = torch.zeros(6, 3, 4, 4)
    x[torch.arange(6), labels] = 1.0  # class = brightest channel

    def classifier(batch):
        return batch.mean(dim=(2, 3))

    assert class_accuracy(classifier, x, labels, batch_size=4) == 1.0
    assert class_accuracy(classifier, x, torch.tensor([0, 1, 2, 1, 2, 0])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="labels"):
        class_accuracy(classifier, x, labels[:3])


def test_write_report(tmp_path):
    def fid(net, value):
        return {"feature_net": net, "fid": value, "kid_mean": 0.01, "kid_std": 0.001, "num_fake": 10}

    results = {
        "base32": {
            "cascaded": {
                "features": {
                    "inception-v3": fid("inception-v3", 12.5),
                    "classifier32": fid("classifier32", 3.0),
                }
            }
        },
        "sr64": {
            "teacher-forced": {
                "features": {"classifier32": fid("classifier32", 2.0)},
                "consistency_psnr": math.inf,
                "class_accuracy": 0.9,
            },
            "cascaded": {"features": {"classifier32": fid("classifier32", 4.0)}, "consistency_psnr": 31.2},
        },
    }
    write_report(results, tmp_path / "r.json", tmp_path / "r.md", meta={"num_samples": 10})
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["results"]["sr64"]["teacher-forced"]["consistency_psnr"] == "inf"
    assert loaded["meta"] == {"num_samples": 10}
    md = (tmp_path / "r.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| stage"))
    for label in (
        "FID cascaded [inception-v3]",
        "FID cascaded [classifier32]",
        "FID teacher-forced [classifier32]",
        "KID cascaded [classifier32]",
        "consistency PSNR (dB) teacher-forced",
        "class acc teacher-forced",
    ):
        assert label in header
    assert "| base32 |" in md and "| sr64 |" in md and "12.50" in md and "90.0%" in md
    bad = {"sr64": {"cascaded": {"features": {"inception-v3": fid("classifier32", 1.0)}}}}
    with pytest.raises(ValueError, match="feature network"):
        write_report(bad, tmp_path / "b.json", tmp_path / "b.md")


def test_sweep_plot_and_best_setting(tmp_path):
    records = [
        {"stage": "base32", "w": w, "aug_level": None, "fid": 10 - w, "feature_net": "toy"}
        for w in (0.0, 1.0, 3.0)
    ] + [
        {
            "stage": "sr64",
            "w": w,
            "aug_level": s,
            "fid": (w - 1) ** 2 + (s - 0.2) ** 2 + 1,
            "feature_net": "toy",
        }
        for w in (0.0, 1.0, 2.0)
        for s in (0.0, 0.2, 0.5)
    ]
    best = best_setting(records)
    assert (best["base32"]["w"], best["base32"]["fid"]) == (3.0, 7.0)
    assert (best["sr64"]["w"], best["sr64"]["aug_level"]) == (1.0, 0.2)
    plot_sweep(records, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(tmp_path / "sweep.png") > 1000
    with pytest.raises(ValueError, match="mixes feature networks"):
        best_setting(records + [{**records[0], "feature_net": "inception-v3"}])


def test_best_flags_name_every_stages_guide_and_quote_the_guide_checkpoints():
    best = {"base32": {"w": 2.0, "aug_level": None, "guide": "auto", "guide_checkpoint": "runs/small base32"},
            "sr64": {"w": 1.0, "aug_level": 0.1, "guide": "auto", "guide_checkpoint": "runs/sr64-4min"},
            "sr128": {"w": 0.0, "aug_level": 0.2, "guide": "cfg", "guide_checkpoint": None}}
    assert best_flags(best) == ("--w base32=2,sr64=1,sr128=0 --aug-level sr64=0.1,sr128=0.2 "
                                "--guide base32=auto,sr64=auto,sr128=cfg "
                                "--guide-ckpt 'base32=runs/small base32' --guide-ckpt sr64=runs/sr64-4min")
    for r in best.values():
        del r["guide"], r["guide_checkpoint"]  # records written before the guide was recorded
    assert best_flags(best) == "--w base32=2,sr64=1,sr128=0 --aug-level sr64=0.1,sr128=0.2"
