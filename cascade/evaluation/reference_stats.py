"""Reference statistics of real images and their cache next to the shards.

`ReferenceStats` holds what FID and KID need of the real side (FID's Gaussian: mean and covariance; KID: a
uniform random subsample of the real features), computed once per (data, resolution, feature network) by
`compute_reference_stats` and cached by `cached_reference_stats` in `<root>/fid_stats/` (or another folder,
`stats_folder`: a read-only data folder's statistics go to the output folder) under a key of the data's
fingerprint, the feature network's weights and the settings (recomputed when any of them changes).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torchmetrics.image.fid import FrechetInceptionDistance

from cascade.atomic import write_atomic
from cascade.errors import ensure_writable_dir
from cascade.evaluation.features import FeatureNet, ImageSource, PassThrough, iter_features

STATS_FORMAT_VERSION = 1
STATS_DIR_NAME = "fid_stats"


class _Reservoir:
    """Uniform random subsample of at most `capacity` rows of a stream (reservoir sampling, Algorithm R)."""

    def __init__(self, capacity: int | None, seed: int):
        self.capacity = capacity
        self.seen = 0
        self.rows: list[torch.Tensor] = []
        self.buffer: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, rows: torch.Tensor) -> None:
        if self.capacity is None:
            self.rows.append(rows)
            self.seen += rows.shape[0]
            return
        if self.buffer is None:
            self.buffer = rows.new_empty(self.capacity, rows.shape[1])
        fill = max(0, min(rows.shape[0], self.capacity - self.seen))
        self.buffer[self.seen : self.seen + fill] = rows[:fill]
        rest = rows[fill:]
        if rest.shape[0]:
            # row i of the stream replaces a uniform slot j ∈ [0, i] when j < capacity (Algorithm R)
            stream_index = self.seen + fill + torch.arange(rest.shape[0])
            slots = (torch.rand(rest.shape[0], generator=self.generator) * (stream_index + 1)).long()
            for slot, row in zip(slots.tolist(), rest):
                if slot < self.capacity:
                    self.buffer[slot] = row
        self.seen += rows.shape[0]

    def result(self) -> torch.Tensor:
        if self.capacity is None:
            return torch.cat(self.rows)
        return self.buffer[: min(self.seen, self.capacity)].clone()



@dataclass(frozen=True)
class ReferenceStats:
    """Real-image statistics of one (data, resolution, feature network): FID's Gaussian, KID's features."""

    mean: torch.Tensor  # D, float64
    cov: torch.Tensor  # D×D, float64, unbiased sample covariance
    num_samples: int
    kid_features: torch.Tensor  # K×D float32, a uniform random subsample of the real features
    feature_net: str
    feature_fingerprint: str
    data_fingerprint: str = ""


def fid_metric(num_features: int) -> FrechetInceptionDistance:
    """torchmetrics' FID on already-extracted features (float64 sums), real statistics kept across resets."""
    # sync_on_compute=False here and below: the caller gathers images / features across processes itself; a
    # torchmetrics sync in compute() would wait for processes that never call it (accelerate launch).
    return FrechetInceptionDistance(feature=PassThrough(num_features), reset_real_features=False,
                                    sync_on_compute=False)


def compute_reference_stats(
    images: ImageSource,
    feature_net: FeatureNet,
    *,
    data_fingerprint: str = "",
    batch_size: int = 64,
    max_samples: int | None = None,
    kid_max_features: int | None = 5000,
    resolution: int | None = None,
    seed: int = 0,
) -> ReferenceStats:
    """Extract features of real images once: FID mean / covariance (torchmetrics' accumulation, float64) and
    up to kid_max_features features for KID (None keeps all)."""
    if kid_max_features is not None and kid_max_features < 2:
        raise ValueError(f"kid_max_features must be at least 2 or None, got {kid_max_features}")
    fid = fid_metric(feature_net.num_features)
    reservoir = _Reservoir(kid_max_features, seed)
    for features, _ in iter_features(
        feature_net, images, batch_size=batch_size, max_samples=max_samples, resolution=resolution
    ):
        fid.update(features.double(), real=True)
        reservoir.add(features)
    n = int(fid.real_features_num_samples)
    if n < 2:
        raise ValueError(f"reference statistics need at least 2 real images, got {n}")
    mean = fid.real_features_sum / n
    # unbiased covariance from the sums, as in FrechetInceptionDistance.compute: (Σ ffᵀ − n μμᵀ)/(n−1)
    cov = (fid.real_features_cov_sum - n * torch.outer(mean, mean)) / (n - 1)
    return ReferenceStats(
        mean=mean,
        cov=cov,
        num_samples=n,
        kid_features=reservoir.result(),
        feature_net=feature_net.name,
        feature_fingerprint=feature_net.fingerprint(),
        data_fingerprint=data_fingerprint,
    )


def load_reference_into_fid(fid: FrechetInceptionDistance, stats: ReferenceStats) -> None:
    """Set FID's real-feature state from cached statistics (the inverse of compute_reference_stats)."""
    n = stats.num_samples
    mean = stats.mean.double()
    fid.real_features_sum = (n * mean).to(fid.real_features_sum.device)
    # Σ ffᵀ = (n−1)·cov + n μμᵀ (inverse of the unbiased covariance above)
    fid.real_features_cov_sum = ((n - 1) * stats.cov.double() + n * torch.outer(mean, mean)).to(
        fid.real_features_cov_sum.device
    )
    fid.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=fid.real_features_sum.device)


def shard_fingerprint(root: str | Path, split: str, pattern: str | None = None) -> str:
    """Fingerprint of a split's data: dataset.json content plus every shard's name, size and mtime."""
    root = Path(root)
    shards = sorted(root.glob(pattern or f"{split}-*.tar"))
    if not shards:
        raise FileNotFoundError(f"no shards matching {pattern or f'{split}-*.tar'} in {root}")
    digest = hashlib.sha256()
    manifest = root / "dataset.json"
    if manifest.is_file():
        digest.update(manifest.read_bytes())
    for shard in shards:
        info = shard.stat()
        digest.update(f"{shard.name}|{info.st_size}|{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def reference_stats_path(root: str | Path, split: str, resolution: int, feature_net_name: str,
                         stats_dir: str | Path | None = None) -> Path:
    """`<stats_dir>/<split>-<resolution>-<feature net>.safetensors` (JSON sidecar: same stem, .json);
    ``stats_dir`` defaults to `<root>/fid_stats`."""
    folder = Path(root) / STATS_DIR_NAME if stats_dir is None else Path(stats_dir)
    return folder / f"{split}-{resolution}-{feature_net_name}.safetensors"


def stats_folder(data_root: str | Path, stats_dir: str | Path | None, out_dir: str | Path) -> tuple[Path, bool]:
    """Where an evaluation caches its real-image statistics, checked before any sampling: (folder, whether it
    is the fallback). ``stats_dir`` (--stats-dir) when given (OutputNotWritable naming --stats-dir when it
    cannot be written); else `<data_root>/fid_stats` when that folder (or, before its first use, the data
    folder) takes writes; else `<out_dir>/fid_stats` (the fallback, for a read-only data folder)."""
    if stats_dir is not None:
        return ensure_writable_dir(stats_dir, "--stats-dir"), False
    beside_data = Path(data_root).absolute() / STATS_DIR_NAME
    existing = beside_data if beside_data.is_dir() else beside_data.parent
    if not existing.is_dir() or os.access(existing, os.W_OK):  # False on a read-only mount (EROFS), also for root
        return beside_data, False  # (a missing data folder is reported by whatever reads it)
    return Path(out_dir).absolute() / STATS_DIR_NAME, True


def cached_reference_stats(
    root: str | Path,
    split: str,
    resolution: int,
    feature_net: FeatureNet,
    images: ImageSource,
    *,
    data_fingerprint: str | None = None,
    batch_size: int = 64,
    max_samples: int | None = None,
    kid_max_features: int | None = 5000,
    seed: int = 0,
    stats_dir: str | Path | None = None,
) -> ReferenceStats:
    """Reference statistics for (data, resolution, feature network), cached next to the shards (in
    ``stats_dir`` when given, see `stats_folder`; statistics already cached beside the shards are read from
    there even then, e.g. from a data folder that became read-only).

    The cache key is the data fingerprint (default: `shard_fingerprint(root, split)`), the feature network's
    name and weight fingerprint, the resolution and the sampling settings; when the stored key matches,
    `images` is not touched (pass a callable to defer even creating the iterator), otherwise the statistics
    are recomputed and the file is replaced.
    """
    if data_fingerprint is None:
        data_fingerprint = shard_fingerprint(root, split)
    key = {
        "format_version": STATS_FORMAT_VERSION,
        "split": split,
        "resolution": resolution,
        "feature_net": feature_net.name,
        "feature_fingerprint": feature_net.fingerprint(),
        "data_fingerprint": data_fingerprint,
        "max_samples": max_samples,
        "kid_max_features": kid_max_features,
        "seed": seed,
    }
    path = reference_stats_path(root, split, resolution, feature_net.name, stats_dir)
    # statistics cached beside a (now read-only) data folder are used too; new ones go to `path`
    for cached in dict.fromkeys((path, reference_stats_path(root, split, resolution, feature_net.name))):
        stats = _load_stats(cached, key)
        if stats is not None:
            return stats
    stats = compute_reference_stats(
        images,
        feature_net,
        data_fingerprint=data_fingerprint,
        batch_size=batch_size,
        max_samples=max_samples,
        kid_max_features=kid_max_features,
        resolution=resolution,
        seed=seed,
    )
    _save_stats(path, key, stats)
    return stats


def _load_stats(path: Path, key: dict) -> ReferenceStats | None:
    sidecar = path.with_suffix(".json")
    if not (path.is_file() and sidecar.is_file()):
        return None
    try:
        info = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        return None
    if info.get("key") != key:
        return None
    with safe_open(str(path), framework="pt") as f:
        if json.loads((f.metadata() or {}).get("key", "null")) != key:
            return None  # tensors and sidecar from different runs: recompute
        tensors = {name: f.get_tensor(name) for name in ("mean", "cov", "kid_features")}
    return ReferenceStats(
        mean=tensors["mean"],
        cov=tensors["cov"],
        num_samples=int(info["num_samples"]),
        kid_features=tensors["kid_features"],
        feature_net=key["feature_net"],
        feature_fingerprint=key["feature_fingerprint"],
        data_fingerprint=key["data_fingerprint"],
    )


def _save_stats(path: Path, key: dict, stats: ReferenceStats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "mean": stats.mean.double().contiguous(),
        "cov": stats.cov.double().contiguous(),
        "kid_features": stats.kid_features.float().contiguous(),
    }
    # serialized in memory and written by write_atomic: a full disk is an OSError naming the file, and
    # leaves no temporary file
    write_atomic(path, safetensors_bytes(tensors, metadata={"key": json.dumps(key),
                                                            "num_samples": str(stats.num_samples)}),
                 tmp_suffix=f".tmp{os.getpid()}")
    info = {
        "key": key,
        "num_samples": stats.num_samples,
        "num_kid_features": int(stats.kid_features.shape[0]),
        "num_features": int(stats.mean.shape[0]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_atomic(path.with_suffix(".json"), json.dumps(info, indent=2) + "\n", tmp_suffix=f".tmp{os.getpid()}")
