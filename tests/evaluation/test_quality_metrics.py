"""Precision / recall, FID's bootstrap and bias mark, memorisation and CAS on synthetic data (closed forms and
hand-built cases), their determinism for a seed, and one-line errors for impossible settings."""

from __future__ import annotations

import math

import pytest
import torch

from cascade.evaluation.cas import (
    CASSettings,
    SmallCNN,
    cas_with_ceiling,
    classification_accuracy_score,
    train_classifier,
)
from cascade.evaluation.memorisation import (
    memorisation,
    nearest_neighbours,
    pixel_vectors,
    typical_same_class_distance,
)
from cascade.evaluation.metrics import (
    MIN_FID_SAMPLES,
    best_setting,
    fid_bootstrap,
    fid_is_biased,
    frechet_distance,
    precision_recall,
)
from cascade.evaluation.reference_stats import ReferenceStats
from cascade.evaluation.tables import fid_cell, summary_table


def gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


# ------------------------------------------------------------------------------------------------------
# Precision / recall


def test_precision_recall_identical_sets_score_one_and_far_sets_zero():
    x = gaussian(50, 8, 0)
    assert precision_recall(x, x.clone(), k=3) == (1.0, 1.0)
    assert precision_recall(x, gaussian(40, 8, 1, shift=100.0), k=3) == (0.0, 0.0)


def test_precision_recall_separates_quality_from_coverage():
    """Generated samples that cover only one of two real modes: every sample is realistic (precision 1),
    half the real data is missed (recall ≈ 1/2)."""
    real = torch.cat([gaussian(60, 2, 0) * 0.1, gaussian(60, 2, 1) * 0.1 + 10])
    collapsed = gaussian(60, 2, 2) * 0.1  # the first mode only
    precision, recall = precision_recall(real, collapsed, k=3)
    assert precision >= 0.95 and 0.4 <= recall <= 0.5


def test_precision_recall_hand_computed_case():
    # real points 0, 1, 2, 10 on a line; k = 1 radii: 1, 1, 1, 8 (10's nearest is 2)
    real = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    fake = torch.tensor([[0.5], [5.0], [20.0]])  # 0.5 inside; 5 inside 10's ball (|5-10| = 5 <= 8); 20 outside
    precision, _ = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(2 / 3)


def test_precision_recall_errors_are_one_line():
    x = gaussian(3, 4, 0)
    with pytest.raises(ValueError, match=r"^precision/recall: k=3 needs more than 3 generated samples, got 3"):
        precision_recall(gaussian(10, 4, 1), x, k=3)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        precision_recall(x, x, k=0)


# ------------------------------------------------------------------------------------------------------
# FID: closed form, bootstrap, bias mark


def test_frechet_distance_closed_form():
    d = 4
    mean1, mean2 = torch.zeros(d), torch.full((d,), 2.0)
    # diagonal covariances: Σ (√a − √b)² per dimension, plus ‖μ₁ − μ₂‖²
    cov1, cov2 = torch.diag(torch.tensor([1.0, 4.0, 9.0, 1.0])), torch.diag(torch.tensor([4.0, 1.0, 1.0, 1.0]))
    expected = 4 * 4.0 + (1 + 1 + 4 + 0)
    assert frechet_distance(mean1, cov1, mean2, cov2) == pytest.approx(expected, rel=1e-9)


def _stats(features: torch.Tensor) -> ReferenceStats:
    return ReferenceStats(mean=features.double().mean(0), cov=torch.cov(features.double().T), num_samples=len(features),
                          kid_features=features, feature_net="toy", feature_fingerprint="")


def test_fid_bootstrap_interval_is_deterministic_and_shrinks_with_samples():
    reference = _stats(gaussian(4000, 3, 0))
    small, large = gaussian(100, 3, 1, shift=0.5), gaussian(2000, 3, 2, shift=0.5)
    first, again = fid_bootstrap(reference, small, 50, seed=3), fid_bootstrap(reference, small, 50, seed=3)
    assert first == again and first != fid_bootstrap(reference, small, 50, seed=4)
    low, high = first
    assert low < 3 * 0.25 < high  # ‖μ₁ − μ₂‖² = 3 · 0.5² lies inside
    large_low, large_high = fid_bootstrap(reference, large, 50, seed=3)
    assert large_high - large_low < high - low
    with pytest.raises(ValueError, match="bootstrap: needs at least 2 resamples"):
        fid_bootstrap(reference, small, 1)


def test_fid_bootstrap_interval_brackets_the_fid_it_comes_with():
    """Resampling with replacement duplicates features and inflates FID; the bias-corrected interval still
    holds the point estimate (here a near-zero FID, where an uncorrected percentile interval lies above it)."""
    features = gaussian(4000, 3, 0)
    reference = _stats(features)
    fake = features[:200]
    fid = frechet_distance(fake.double().mean(0), torch.cov(fake.double().T), reference.mean, reference.cov)
    low, high = fid_bootstrap(reference, fake, 100, seed=0)
    assert 0.0 <= low <= fid <= high



def test_small_sample_fid_is_marked_biased():
    assert fid_is_biased(50_000, 20, 64) and fid_is_biased(50_000, 2047, 64) and fid_is_biased(5000, 3000, 4096)
    assert not fid_is_biased(50_000, MIN_FID_SAMPLES, 2048)
    assert fid_cell({"fid": 12.5, "num_fake": 20, "fid_biased": True}) == "12.50 (n=20, biased)"
    assert fid_cell({"fid": 3.1, "fid_ci": [2.9, 3.4], "num_fake": 5000, "fid_biased": False}) == \
        "3.10 [2.90, 3.40] (n=5000)"
    columns, rows = summary_table({"cascaded": {"features": {"net": {
        "fid": 12.5, "kid_mean": -0.001, "kid_std": 0.002, "num_fake": 20, "fid_biased": True,
        "precision": 0.5, "recall": 0.25}}, "class_accuracy": 0.4}})
    assert columns[1:3] == ["KID ± std", "FID"]  # KID leads
    assert rows[0][1:4] == ["-0.00100 ± 0.00200 (n=20)", "12.50 (n=20, biased)", "0.50 / 0.25"]


def test_best_setting_by_any_metric():
    records = [{"stage": "sr64", "w": w, "aug_level": 0.1, "feature_net": "n", "fid": f, "recall": r,
                "detail_ratio": d, "consistency_psnr": None}
               for w, f, r, d in ((0.0, 5.0, 0.9, 0.5), (1.0, 3.0, 0.5, 1.3), (2.0, 4.0, 0.7, 1.1))]
    assert best_setting(records)["sr64"]["w"] == 1.0
    assert best_setting(records, "recall")["sr64"]["w"] == 0.0
    assert best_setting(records, "detail_ratio")["sr64"]["w"] == 2.0  # closest to 1
    assert best_setting(records, "consistency_psnr")["sr64"]["w"] == 1.0  # absent: ranked by FID
    with pytest.raises(ValueError, match="rank metric 'sharpness' is unknown"):
        best_setting(records, "sharpness")


# ------------------------------------------------------------------------------------------------------
# Memorisation


def _class_images(num_classes: int, per_class: int, seed: int, res: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class a random colour pattern plus strong per-image noise: images of a class are alike, none equal."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.rand(num_classes, 3, res, res, generator=g) * 1.2 - 0.6
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = (prototypes[labels] + 0.35 * torch.randn(len(labels), 3, res, res, generator=g)).clamp(-1, 1)
    return images, labels


def test_memorisation_flags_exact_copies_and_not_held_out_real_images():
    train, labels = _class_images(4, 10, seed=1)
    held_out, _ = _class_images(4, 5, seed=2)
    copies = train[torch.tensor([0, 13, 27, 39])]
    samples = torch.cat([copies, held_out[:4]])
    result = memorisation(pixel_vectors(samples), pixel_vectors(train), labels, held_out=pixel_vectors(held_out))
    flagged = result["distance"] < result["threshold"]
    assert flagged.tolist() == [True] * 4 + [False] * 4
    assert result["index"][:4].tolist() == [0, 13, 27, 39] and result["distance"][:4].abs().max() < 1e-5
    assert result["fraction"] == 0.5 and result["held_out_fraction"] == 0.0
    assert result["threshold"] == pytest.approx(0.5 * result["typical"])


def test_memorisation_distances_by_hand():
    train = torch.tensor([[0.0, 0.0], [3.0, 0.0], [10.0, 0.0], [10.0, 4.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert typical_same_class_distance(train, labels) == pytest.approx(3.0)  # median of 3, 3, 4, 4 (lower)
    distance, index = nearest_neighbours(torch.tensor([[9.0, 0.0]]), train)
    assert (float(distance[0]), int(index[0])) == (1.0, 2)
    with pytest.raises(ValueError, match="no class has two training images"):
        typical_same_class_distance(train[:2], torch.tensor([0, 1]))
    # pixel distances are RMS differences at 32²
    a, b = torch.zeros(1, 3, 64, 64), torch.full((1, 3, 64, 64), 0.5)
    assert torch.dist(pixel_vectors(a), pixel_vectors(b)) == pytest.approx(0.5, rel=1e-5)


# ------------------------------------------------------------------------------------------------------
# CAS


FAST_CAS = CASSettings(steps=60, batch_size=16, width=16)


def _colour_classes(n_per_class: int, seed: int, num_classes: int = 4, res: int = 16):
    """Class c: a flat colour c with noise (easy to learn from any sample of it)."""
    colours = torch.tensor([[0.8, -0.8, -0.8], [-0.8, 0.8, -0.8], [-0.8, -0.8, 0.8], [0.8, 0.8, -0.8]])[:num_classes]
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    images = (colours[labels][:, :, None, None] + 0.3 * torch.randn(len(labels), 3, res, res, generator=g))
    return images.clamp(-1, 1), labels


def test_cas_real_vs_real_reaches_the_ceiling_and_noise_is_at_chance(one_thread):
    train, train_labels = _colour_classes(8, seed=0)
    test, test_labels = _colour_classes(10, seed=1)
    other, other_labels = _colour_classes(8, seed=2)  # a second real set: stands in for perfect samples
    real = cas_with_ceiling(other, other_labels, train, train_labels, test, test_labels, 4, FAST_CAS, seed=0)
    assert real["real_top1"] >= 0.95 and real["top1"] >= real["real_top1"] - 0.05
    assert real["num_train"] == 32 and real["num_test"] == 40 and "top5" not in real  # top-5 only beyond 5 classes
    noise = torch.rand(train.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1
    chance = classification_accuracy_score(noise, train_labels, test, test_labels, 4, FAST_CAS, seed=0)
    assert chance["top1"] <= 0.5  # chance is 0.25; far below the ceiling


def test_cas_flips_only_where_mirror_images_keep_their_class(one_thread):
    # class 0 bright on the left, class 1 bright on the right: a mirror image is the other class
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(2).repeat_interleave(16)
    images = torch.full((32, 3, 16, 16), -0.8) + 0.1 * torch.randn(32, 3, 16, 16, generator=g)
    images[labels == 0, :, :, :8] += 1.6
    images[labels == 1, :, :, 8:] += 1.6
    settings = CASSettings(steps=40, batch_size=16, width=8)
    kept = classification_accuracy_score(images, labels, images, labels, 2, settings, seed=0, hflip=False)
    flipped = classification_accuracy_score(images, labels, images, labels, 2, settings, seed=0, hflip=True)
    assert kept["top1"] == 1.0 and flipped["top1"] <= 0.75  # flips teach it that both halves mean both classes


def test_cas_is_deterministic_for_a_seed(one_thread):
    train, labels = _colour_classes(3, seed=0)
    settings = CASSettings(steps=5, batch_size=4, width=8)
    a, b = (train_classifier(train, labels, 4, settings, seed=7) for _ in range(2))
    c = train_classifier(train, labels, 4, settings, seed=8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_cas_impossible_settings_are_one_line_errors():
    images, labels = _colour_classes(1, seed=0)
    with pytest.raises(ValueError, match=r"^CAS: needs at least one training image per class: got 2 images for 4"):
        train_classifier(images[:2], labels[:2], 4, FAST_CAS)
    with pytest.raises(ValueError, match="CAS: class 3 has no training image"):
        train_classifier(images[[0, 1, 2, 0]], labels[[0, 1, 2, 0]], 4, FAST_CAS)
    with pytest.raises(ValueError, match="CAS steps must be an integer >= 1"):
        CASSettings(steps=0)
    with pytest.raises(ValueError, match="as many real training images as generated ones"):
        cas_with_ceiling(images, labels, images[:2], labels[:2], images, labels, 4, FAST_CAS)
    with pytest.raises(ValueError, match="power of two"):
        SmallCNN(24, 4)
    assert math.isclose(SmallCNN(256, 10)(torch.zeros(1, 3, 256, 256)).shape[1], 10)
