"""Feature networks for FID / KID / Inception Score.

Common interface (`FeatureNet`): an nn.Module that takes float images in [-1, 1], B×3×H×W at any square
resolution, and returns features B×`num_features`; `name` labels every metric computed with it, so the
standard Inception and the project's own features are never confused; `logits(x)` exists when the
network has class logits (`num_classes` is not None); `fingerprint()` identifies name + weights for the
reference-statistics cache; `source` says in one line where the network comes from (a checkpoint and its
step, the judge and its val accuracy), for the results that name it. Feature networks never leave eval mode and
never need gradients.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from cascade.checks import is_int_at_least
from cascade.imageops import check_image_batch, float_to_uint8, resize

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"

# Images for the metrics: a B×3×H×W tensor, an iterable of such tensors (or of {"x": tensor} batches), or a
# zero-argument callable returning such an iterable (called lazily, so a cache hit never opens the data).
ImageSource = torch.Tensor | Iterable | Callable[[], Iterable]


class FeatureNet(nn.Module):
    """Base class: subclasses implement `features_and_logits(x) -> (B×D features, B×K logits or None)`."""

    def __init__(self, name: str, num_features: int, num_classes: int | None = None):
        super().__init__()
        if not isinstance(name, str) or not _NAME_PATTERN.match(name):
            raise ValueError(
                f"feature network name must match {_NAME_PATTERN.pattern} (used in file names), got {name!r}"
            )
        self.name = name
        self.num_features = int(num_features)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.source = name  # set by whoever loads the network: where it comes from, one line

    @property
    def has_logits(self) -> bool:
        return self.num_classes is not None

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_logits:
            raise ValueError(f"feature network {self.name!r} has no class logits")
        return self.features_and_logits(x)[1]

    def train(self, mode: bool = True) -> FeatureNet:
        """Feature networks stay in eval mode (fixed BatchNorm statistics, no dropout)."""
        return super().train(False)

    def identity_config(self) -> dict:
        """Settings besides the weights that change the features (part of the fingerprint)."""
        return {}

    def fingerprint(self) -> str:
        """sha256 of the name, class, identity settings and every weight and buffer (dtype, shape, bytes)."""
        digest = hashlib.sha256()
        digest.update(f"{type(self).__name__}|{self.name}|{self.num_features}|{self.num_classes}".encode())
        digest.update(repr(sorted(self.identity_config().items())).encode())
        for key, tensor in sorted(self.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


class InceptionFeatures(FeatureNet):
    """The standard FID Inception-v3 (torch-fidelity, 2048-d pool features, 1008 logits) from a local file.

    Needs the `fid` extra (`pip install .[fid]`) and the weights file `pt_inception-2015-12-05-6726825d.pth`
    on disk; nothing is ever downloaded. Images are quantised to uint8 as the reference implementation
    expects; torch-fidelity resizes them to 299×299 itself.
    """

    def __init__(self, weights_path: str | Path | None, name: str = "inception-v3"):
        hint = (
            f"pass a local copy of the FID Inception weights ({INCEPTION_WEIGHTS_FILE}) with "
            "--inception-weights PATH (nothing is downloaded), and install the fid extra with "
            "`pip install .[fid]`"
        )
        if weights_path is None:
            raise FileNotFoundError(f"no Inception weights file given: {hint}")
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights file not found: {path}; {hint}")
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as err:
            raise ModuleNotFoundError(
                f"the Inception feature network needs torch-fidelity (the fid extra): `pip install .[fid]`; "
                f"then pass the weights with --inception-weights PATH ({err})"
            ) from err
        super().__init__(name, num_features=2048, num_classes=1008)
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
        )
        self.net.requires_grad_(False)
        self.eval()

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_image_batch(x, "feature network input", channels=3, floating=True)
        images_uint8 = float_to_uint8(x).permute(0, 3, 1, 2).contiguous()
        features, logits = self.net(images_uint8)
        return features, logits


class ClassifierFeatures(FeatureNet):
    """Penultimate features and logits of a classifier trained on the dataset (offline feature network).

    The wrapped classifier is put in eval mode. It is called as `model(x, t)` with t = 0 (a noise-aware
    classifier such as classifier32 on clean images) or as `model(x)` when `noise_aware=False`; it must return
    logits B×num_classes. Images are resized to `resolution` with `cascade.imageops.resize`. The features
    are the input of the `head` module (a dotted name from `model.named_modules()`), flattened to B×D; by
    default the head is the last module with parameters of its own that runs in the forward pass (the final
    linear / 1×1 conv layer; `head` for cascade.nets.classifier.NoisyClassifier).
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        resolution: int,
        head: str | None = None,
        noise_aware: bool = True,
    ):
        if not isinstance(resolution, int) or resolution <= 0:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        modules = dict(model.named_modules())
        if head is not None and head not in modules:
            raise ValueError(f"classifier has no module named {head!r}")
        model.eval()
        probe = torch.zeros(2, 3, resolution, resolution, device=device_of(model))
        with torch.no_grad():
            if head is None:
                head = _last_parametrised_module(model, probe, noise_aware)
            features, logits = _run_with_head_input(model, modules[head], probe, noise_aware)
        super().__init__(name, num_features=features.shape[1], num_classes=logits.shape[1])
        self.model = model
        self.resolution = resolution
        self.head = head
        self.noise_aware = noise_aware
        self.eval()

    def identity_config(self) -> dict:
        return {"resolution": self.resolution, "head": self.head, "noise_aware": self.noise_aware}

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_image_batch(x, "feature network input", channels=3, floating=True)
        x = resize(x.to(device_of(self.model)), self.resolution)
        head_module = dict(self.model.named_modules())[self.head]
        return _run_with_head_input(self.model, head_module, x, self.noise_aware)


class PatchFeatures(FeatureNet):
    """Features of full-resolution patches (patch FID): what an SR stage adds is invisible to features of
    the whole image at a low resolution, but not to features of `patch`×`patch` crops at the image's own
    resolution. Each image gives a k×k grid of evenly spaced patches, k = min(R // patch, max_per_side), so a
    batch of B images returns B·k² feature rows (metrics count patches); no logits."""

    def __init__(self, inner: FeatureNet, patch: int, max_per_side: int = 4):
        if not isinstance(inner, FeatureNet):
            raise TypeError(f"inner must be a FeatureNet, got {type(inner).__name__}")
        for what, value in (("patch", patch), ("max_per_side", max_per_side)):
            if not is_int_at_least(value, 1):
                raise ValueError(f"{what} must be a positive int, got {value!r}")
        super().__init__(f"{inner.name}-patch{patch}", num_features=inner.num_features)
        self.inner, self.patch, self.max_per_side = inner, patch, max_per_side
        self.eval()

    def identity_config(self) -> dict:
        return {"patch": self.patch, "max_per_side": self.max_per_side}

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """B×3×R×R → (B·k²)×3×patch×patch, image-major, rows then columns."""
        check_image_batch(x, "feature network input", channels=3, floating=True)
        size = x.shape[-1]
        if x.shape[-2] != size or size < self.patch:
            raise ValueError(f"{self.name}: needs square images of at least {self.patch}², got {tuple(x.shape[-2:])}")
        k = min(size // self.patch, self.max_per_side)
        starts = torch.linspace(0, size - self.patch, k).round().long().tolist()
        crops = [x[:, :, i : i + self.patch, j : j + self.patch] for i in starts for j in starts]
        return torch.stack(crops, dim=1).flatten(0, 1)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.inner(self.patches(x)), None


def feature_sources(nets: Iterable[FeatureNet]) -> dict[str, str]:
    """{name: `source`} of feature networks (each name once), for the results that name them."""
    return {net.name: net.source for net in nets}


def device_of(module: nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (CPU when it has none)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _call(model: nn.Module, x: torch.Tensor, noise_aware: bool) -> torch.Tensor:
    if noise_aware:
        return model(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
    return model(x)


def _run_with_head_input(
    model: nn.Module, head: nn.Module, x: torch.Tensor, noise_aware: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        logits = _call(model, x, noise_aware)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"the classifier's forward pass never called its head module {type(head).__name__}")
    features = captured[-1].flatten(1)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"classifier must return logits B×num_classes, got {shape}")
    return features, logits


def _last_parametrised_module(model: nn.Module, probe: torch.Tensor, noise_aware: bool) -> str:
    names = {module: name for name, module in model.named_modules()}
    called: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda m, _args: called.append(names[m]))
        for module in names
        if any(True for _ in module.parameters(recurse=False))
    ]
    try:
        _call(model, probe, noise_aware)
    finally:
        for handle in handles:
            handle.remove()
    if not called:
        raise ValueError("the classifier has no module with parameters to take features from; pass head=")
    return called[-1]


class PassThrough(nn.Module):
    """Feature module for torchmetrics' FID / KID / IS that receives already-extracted features B×D."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def image_batches(source: ImageSource, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield image batches of at most batch_size from an `ImageSource`; ValueError on anything but
    B×3×H×W tensors or a non-positive batch_size."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(source, torch.Tensor):
        source = [source]
    elif callable(source) and not isinstance(source, Iterable):
        source = source()
    for batch in source:
        if isinstance(batch, Mapping):
            if "x" not in batch:
                raise ValueError(f"batch mappings must hold images under 'x', got keys {sorted(batch)}")
            batch = batch["x"]
        check_image_batch(batch, "image batches", channels=3)
        yield from batch.split(batch_size)


def iter_features(feature_net: FeatureNet, images: ImageSource, *, batch_size: int = 64,
                  max_samples: int | None = None, resolution: int | None = None,
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (features B×D float32 on CPU, logits B×K or None) per batch; stop after max_samples images.
    `resolution`, when given, is checked against every batch (catches feeding the wrong pyramid level)."""
    device = device_of(feature_net)
    seen = 0
    with torch.no_grad():
        for batch in image_batches(images, batch_size):
            if resolution is not None and tuple(batch.shape[-2:]) != (resolution, resolution):
                raise ValueError(f"expected {resolution}×{resolution} images, got {tuple(batch.shape[-2:])}")
            if max_samples is not None:
                if seen >= max_samples:
                    return
                batch = batch[: max_samples - seen]
            features, logits = feature_net.features_and_logits(batch.to(device))
            seen += batch.shape[0]
            yield features.float().cpu(), None if logits is None else logits.float().cpu()


def extract_features(feature_net: FeatureNet, images: ImageSource, *, batch_size: int = 64) -> torch.Tensor:
    """All features N×D (float32, CPU) of an `ImageSource` in one tensor."""
    parts = [f for f, _ in iter_features(feature_net, images, batch_size=batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, feature_net.num_features)
