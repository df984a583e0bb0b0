"""Quality benchmark: train named recipes of one stage for the same budget, sample, and score the samples.

For one stage and one shard folder, every recipe (a named set of stage and trainer overrides, `RECIPES`) is
trained with the project's own trainer (`cascade.training.trainer.StageTrainer`) for the same wall-clock budget
(`trainer.max_seconds`) or the same number of steps, from the same seed. Each trained stage is then sampled
with every sampler setting (`SamplerSetting`: a sampler of `cascade.diffusion.samplers.SAMPLERS`, its step count,
the guidance weight w and for SR stages the augmentation level s) and scored:

- base stages: N samples per class, judged by `cascade.harness.judge` (a classifier trained on the real train
  split only): class accuracy (label = the class a sample was generated for), Fréchet distance and KID
  against the real val split in the judge's features; beside the judge's accuracy on real val images (the
  ceiling) and real train images scored like samples (the floor of FD / KID at the same count);
- SR stages, teacher-forced on real low-resolution val inputs: consistency PSNR (the sample downsampled
  against its input), PSNR to the real image and the detail ratio (`cascade.evaluation.metrics`), beside bicubic
  upsampling of the same inputs.

Every row also gives network evaluations per image (forward passes counted, a guided step = 2), sampling
seconds and the training steps and seconds; every report names the machine (CPU, native bf16 or not),
the torch version and the load average (other processes share the CPU). `tools/quality_bench.py` is the
command line and `cascade.harness.quality_report` writes the report.

Longer than ~400 lines as one cohesive thing: the recipes, sampler specs, checks and the run loop share the
benchmark's settings objects, and a reader follows one benchmark run top to bottom here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import platform
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

from cascade import checkpoint
from cascade.atomic import write_atomic
from cascade.config import StageConfig, StageKind
from cascade.data.shard_folder import read_dataset_info
from cascade.diffusion.augment import condition_low_res
from cascade.diffusion.guidance import classifier_free_guidance
from cascade.diffusion.samplers import SAMPLERS
from cascade.evaluation.cas import CASSettings
from cascade.evaluation.metrics import consistency_psnr, detail_ratio
from cascade.evaluation.reference_stats import shard_fingerprint
from cascade.harness.judge import Judge, JudgeSettings, get_judge, real_floor, score
from cascade.imageops import float_to_uint8, image_grid, uint8_to_float, upsample
from cascade.training.trainer_config import DataConfig, RunConfig, TrainerConfig

RUNS_DIR = "runs"
TRAIN_RECORD = "bench_train.json"  # what a finished training run recorded, read back by --reuse

# Trainer settings every recipe starts from (the issue-14 probe: batch 8, lr 2e-4, EMA 0.999, bf16 where
# native); a recipe's trainer overrides replace them. Only the final checkpoint is written.
BENCH_TRAINER: dict[str, Any] = {"batch_size": 8, "lr": 2e-4, "warmup_steps": 100, "ema_decay": 0.999,
                                 "ema_warmup": 10.0, "p_uncond": 0.1, "grad_clip": 1.0, "mixed_precision": "auto",
                                 "ckpt_every": 0, "keep_last": 1, "log_every": 100, "sample_every": 0}


class BenchError(ValueError):
    """A setting or input the benchmark cannot use; the message is one line naming it and the fix."""


@dataclass(frozen=True)
class Recipe:
    """A named training recipe: nested stage overrides (`StageConfig.with_overrides`) and trainer overrides."""

    description: str
    stage: Mapping[str, Any] = field(default_factory=dict)
    trainer: Mapping[str, Any] = field(default_factory=dict)


# Every recipe but `today` names each objective setting it relies on, so it means the same whatever the preset.
RECIPES: dict[str, Recipe] = {
    "today": Recipe("the stage preset as is (the tiny presets: v-prediction, Min-SNR-5, fixed small variance; the "
                    "paper presets: ε-prediction, learned-range variance, hybrid loss)"),
    "cdm": Recipe("ε-prediction, learned-range variance, hybrid loss (Nichol & Dhariwal 2021 'Improved DDPM' "
                  "§3.1; CDM's recipe and the paper presets'; the tiny presets' before the benchmark)",
                  {"diffusion": {"prediction": "eps", "loss_weighting": "uniform", "loss": "hybrid",
                                 "model_var_type": "learned_range"}}),
    "eps-simple": Recipe("ε-prediction, uniform L_simple, fixed small variance (Ho et al. 2020 'DDPM' eq. 14)",
                         {"diffusion": {"prediction": "eps", "loss_weighting": "uniform", "loss": "simple",
                                        "model_var_type": "fixed_small"}}),
    "v-minsnr5": Recipe("v-prediction (Salimans & Ho 2022) with Min-SNR-5 weighting (Hang et al. 2023), "
                        "fixed small variance",
                        {"diffusion": {"prediction": "v", "loss_weighting": "min_snr", "min_snr_gamma": 5,
                                       "loss": "simple", "model_var_type": "fixed_small"}}),
}
DEFAULT_RECIPES = tuple(RECIPES)


def resolve_recipe(spec: str, recipes: Mapping[str, Recipe] = RECIPES) -> Recipe:
    """The recipe a spec names: a known recipe, optionally followed by `+KEY=VALUE` changes, e.g.
    ``v-minsnr5+lr=1e-3+batch_size=16+diffusion.min_snr_gamma=1``. A bare KEY is a trainer setting
    (`TrainerConfig` field), a dotted SECTION.KEY a stage setting; values are read as YAML scalars
    (``1e-3`` → 0.001, ``true``, ``[8, 16]``). BenchError on an unknown recipe or a malformed change."""
    import yaml

    base, *changes = spec.split("+")
    if base not in recipes:
        raise BenchError(f"--recipes: unknown recipe {base!r}; known recipes: {', '.join(recipes)} "
                         f"(each may be followed by +KEY=VALUE changes, e.g. v-minsnr5+lr=1e-3)")
    recipe = recipes[base]
    if not changes:
        return recipe
    stage = {k: dict(v) if isinstance(v, Mapping) else v for k, v in recipe.stage.items()}
    trainer = dict(recipe.trainer)
    for change in changes:
        key, sep, raw = change.partition("=")
        if not sep or not key or not raw:
            raise BenchError(f"--recipes: bad change {change!r} in {spec!r}; use +KEY=VALUE (trainer) or "
                             f"+SECTION.KEY=VALUE (stage), e.g. v-minsnr5+lr=1e-3+diffusion.min_snr_gamma=1")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise BenchError(f"--recipes: value of {key} in {spec!r} is not readable: {raw!r}") from None
        if isinstance(value, float) or (isinstance(value, str) and re.fullmatch(r"[-+]?[\d.]+e[-+]?\d+", value)):
            value = float(value)  # YAML 1.1 reads 1e-3 as a string
        section, dot, name = key.partition(".")
        if dot:
            if not isinstance(stage.setdefault(section, {}), dict):
                raise BenchError(f"--recipes: {section} in {spec!r} is not a section of the stage configuration")
            stage[section][name] = value
        else:
            trainer[key] = value
    return Recipe(f"{recipe.description}; changed: {', '.join(changes)}", stage, trainer)


def apply_recipe(name: str, stage_cfg: Any, trainer: TrainerConfig,
                 recipes: Mapping[str, Recipe] = RECIPES) -> tuple[Any, TrainerConfig]:
    """(stage config, trainer config) of a recipe spec (`resolve_recipe`); BenchError naming the recipe and any
    key this version's configuration does not know."""
    recipe = resolve_recipe(name, recipes)
    known = stage_cfg.to_dict()
    for section, values in recipe.stage.items():
        if section not in known:
            raise BenchError(f"recipe {name}: stage setting {section!r} is unknown to this version's configuration")
        if isinstance(values, Mapping):
            for key in values:
                if not isinstance(known[section], dict) or key not in known[section]:
                    raise BenchError(f"recipe {name}: stage setting {section}.{key} is unknown to this version's "
                                     f"configuration")
    unknown = sorted(set(recipe.trainer) - {f.name for f in dataclasses.fields(TrainerConfig)})
    if unknown:
        raise BenchError(f"recipe {name}: trainer setting {unknown[0]} is unknown to this version's configuration")
    try:
        return (stage_cfg.with_overrides({k: dict(v) if isinstance(v, Mapping) else v for k, v in recipe.stage.items()}),
                dataclasses.replace(trainer, **recipe.trainer))
    except (ValueError, TypeError) as err:
        raise BenchError(f"recipe {name}: {err}") from None


# ----------------------------------------------------------------------------------------------- samplers


@dataclass(frozen=True)
class SamplerSetting:
    """One way of sampling: `sampler` (a key of cascade.diffusion.samplers.SAMPLERS) over `steps` respaced steps, with
    classifier-free guidance weight w, DDIM η, and (SR stages) the augmentation level s (None: the stage's
    own `sampling.aug_level`); `sample_images` applies it to the stage's own `SamplingSettings`. `label` is the
    spec it was parsed from."""

    label: str
    sampler: str
    steps: int
    w: float | None  # None: the stage's own sampling.w
    eta: float = 0.0
    aug_level: float | None = None
    guidance_interval: tuple[float, float] | None = None  # None: the stage's own sampling.guidance_interval


_SPEC_KEYS = {"w": "w", "eta": "eta", "s": "aug_level", "gi": "guidance_interval"}


def parse_samplers(text: str, default_w: float | None,
                   samplers: Mapping[str, Callable] = SAMPLERS) -> list[SamplerSetting]:
    """`ddim25,ddpm50:w=1,ddim25:s=0.03` → settings. Each item is SAMPLER STEPS (a sampler name followed by its
    step count) and optional `:w=W`, `:eta=E`, `:s=S`; w defaults to `default_w` (None: the stage's own
    `sampling.w`). BenchError on a bad item."""
    names = sorted(samplers, key=len, reverse=True)  # longest first: a name may end in a digit
    example = "e.g. --samplers ddim25,ddpm50:w=1"
    settings = []
    for item in [i.strip() for i in text.split(",")]:
        head, *options = item.split(":")
        name = next((n for n in names if head.startswith(n) and re.fullmatch(r"\d+", head[len(n):])), None)
        if name is None:
            raise BenchError(f"--samplers: bad item {item!r}; expected SAMPLER STEPS with SAMPLER one of "
                             f"{', '.join(samplers)} ({example})")
        values: dict[str, float | None] = {"w": default_w}
        interval = None
        for option in options:
            key, sep, raw = option.partition("=")
            if not sep or key not in _SPEC_KEYS:
                raise BenchError(f"--samplers: bad option {option!r} in {item!r}; use w=W, eta=E, s=S or gi=LO-HI "
                                 f"({example})")
            if key == "gi":
                bounds = re.fullmatch(r"(\d+(?:\.\d*)?)-(\d+(?:\.\d*)?)", raw)
                if bounds is None or float(bounds[1]) > float(bounds[2]):
                    raise BenchError(f"--samplers: gi in {item!r} must be LO-HI timesteps with LO <= HI, e.g. "
                                     f"gi=100-800, got {raw!r}")
                interval = (float(bounds[1]), float(bounds[2]))
                continue
            try:
                values[key] = float(raw)
            except ValueError:
                raise BenchError(f"--samplers: {key} in {item!r} must be a number, got {raw!r}") from None
        steps = int(head[len(name):])
        if steps < 1 or (values["w"] or 0.0) < 0 or values.get("eta", 0.0) < 0 or not 0 <= values.get("s", 0.0) <= 1:
            raise BenchError(f"--samplers: {item!r}: need steps >= 1, w >= 0, eta >= 0 and s in [0, 1]")
        if values.get("eta", 0.0) and "eta" not in inspect.signature(samplers[name]).parameters:
            raise BenchError(f"--samplers: {item!r}: sampler {name} takes no eta")
        settings.append(SamplerSetting(item, name, steps, **{_SPEC_KEYS[k]: v for k, v in values.items()},
                                       guidance_interval=interval))
    labels = [s.label for s in settings]
    if len(set(labels)) != len(labels):
        raise BenchError(f"--samplers: an item is named twice in {text!r}; name each once")
    return settings


@contextlib.contextmanager
def _count_forward_rows(model: torch.nn.Module) -> Iterator[list[int]]:
    """Yields [rows]: the images `model`'s forward passes process while inside (a guided step runs 2 per image)."""
    rows = [0]

    def hook(_module, args, kwargs):
        first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        rows[0] += int(first.shape[0])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def sample_images(model: torch.nn.Module, diffusion: Any, stage_cfg: Any, setting: SamplerSetting,
                  labels: torch.Tensor, x_low: torch.Tensor | None = None, *, seed: int = 0, batch_size: int = 100,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """Sample `labels` (N) with one setting: (N×3×R×R float32 CPU images, network evaluations per image).

    SR stages take clean low-resolution inputs x_low (N×3×r×r in [-1, 1]), re-noised to level s as the
    pipeline does (`condition_low_res`). All noise comes from one generator seeded with `seed`."""
    changes = {"sampler": setting.sampler, "steps": setting.steps, "eta": setting.eta}
    if setting.w is not None:
        changes["w"] = setting.w
    if setting.aug_level is not None:
        changes["aug_level"] = setting.aug_level
    if setting.guidance_interval is not None:
        changes["guidance_interval"] = setting.guidance_interval
    settings = dataclasses.replace(stage_cfg.sampling, **changes)  # the stage's own defaults, as changed
    settings.check_for(stage_cfg)
    sampler = SAMPLERS[settings.sampler]
    options = {"clip_denoised": settings.clip_denoised, "dynamic_threshold": settings.dynamic_threshold}
    if settings.sampler == "ddim":
        options["eta"] = settings.eta
    respaced = diffusion.respace(str(settings.steps))
    guided = (classifier_free_guidance(model, settings.w, stage_cfg.num_classes, settings.guidance_interval,
                                       diffusion.num_timesteps) if settings.w > 0 else model)
    level = settings.aug_level
    generator = torch.Generator(device).manual_seed(seed)
    res, out = stage_cfg.resolution, []
    with _count_forward_rows(model) as rows, torch.no_grad():
        for start in range(0, len(labels), batch_size):
            y = labels[start : start + batch_size].to(device)
            kwargs: dict[str, torch.Tensor] = {"y": y}
            if stage_cfg.kind is StageKind.sr:
                low = x_low[start : start + batch_size].to(device)
                noise = torch.randn(low.shape, generator=generator, device=device)
                low, aug_level = condition_low_res(low, level, noise=noise)
                kwargs.update(x_low=low, aug_level=aug_level)
            x_T = torch.randn((len(y), 3, res, res), generator=generator, device=device)
            out.append(sampler(guided, respaced, x_T=x_T, model_kwargs=kwargs, generator=generator,
                               **options).float().cpu())
    return torch.cat(out), rows[0] / len(labels)


# ----------------------------------------------------------------------------------------------- settings


@dataclass
class BenchConfig:
    """Everything one benchmark run does. Exactly one of `minutes` (wall-clock training budget per recipe)
    and `steps` is set."""

    stage: str
    data: Path
    out: Path
    recipes: list[str]
    samplers: list[SamplerSetting]
    minutes: float | None = None
    steps: int | None = None
    per_class: int = 20
    size: str = "tiny"
    seed: int = 0
    num_workers: int | str = "auto"  # data.num_workers of every training run
    sample_batch: int = 100
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    cas: CASSettings | None = None  # also the Classification Accuracy Score per row (base stages)
    overwrite: bool = False
    reuse: bool = False  # sample runs already trained in `out` (same recipe and budget) instead of retraining
    progress: bool = False


@dataclass
class Prepared:
    """A checked BenchConfig: the dataset record and each recipe's (stage config, trainer config)."""

    config: BenchConfig
    info: dict[str, Any]
    runs: dict[str, tuple[Any, TrainerConfig]]


def prepare(cfg: BenchConfig, presets: Mapping[str, Callable[[str, int], StageConfig]]) -> Prepared:
    """Check every setting and input before anything runs; BenchError (one line) otherwise.

    ``presets``: stage name → ``(size, num_classes) -> StageConfig``, the stage definitions to benchmark (the
    command line passes those of `stages`)."""
    if cfg.stage not in presets:
        raise BenchError(f"--stage: unknown stage {cfg.stage!r}; valid stages: {', '.join(presets)}")
    if (cfg.minutes is None) == (cfg.steps is None):
        raise BenchError("give exactly one training budget: --minutes M or --steps N")
    if cfg.minutes is not None and not cfg.minutes > 0:
        raise BenchError(f"--minutes must be > 0, got {cfg.minutes}")
    if cfg.steps is not None and cfg.steps < 1:
        raise BenchError(f"--steps must be >= 1, got {cfg.steps}")
    for what, value, low in (("--per-class", cfg.per_class, 1), ("--sample-batch", cfg.sample_batch, 1),
                             ("--workers", 0 if cfg.num_workers == "auto" else cfg.num_workers, 0),
                             ("--seed", cfg.seed, 0)):
        if value < low:
            raise BenchError(f"{what} must be >= {low}, got {value}")
    if not cfg.recipes:
        raise BenchError("--recipes: name at least one recipe")
    try:
        info = read_dataset_info(cfg.data)
        for split in ("train", "val"):
            shard_fingerprint(cfg.data, split)
    except (FileNotFoundError, ValueError) as err:
        raise BenchError(f"--data: {err}; pass a shard folder written by tools/make_shards.py") from None
    try:
        stage_cfg = presets[cfg.stage](cfg.size, len(info["class_names"]))
    except ValueError as err:
        raise BenchError(str(err)) from None
    needed = [r for r in (stage_cfg.resolution, stage_cfg.low_resolution) if r is not None]
    if stage_cfg.kind is StageKind.classifier:
        raise BenchError(f"--stage: {cfg.stage} is a classifier; the benchmark trains base or SR stages")
    lacking = [r for r in needed if r not in info["resolutions"]]
    if lacking:
        raise BenchError(f"--data: {cfg.data} has resolutions {sorted(info['resolutions'])} but {cfg.stage} needs "
                         f"{needed}; rewrite the shards with --max-res {max(needed)}")
    budget = {"max_steps": cfg.steps or 10**9, "max_seconds": 60.0 * (cfg.minutes or 0.0)}
    trainer = TrainerConfig(**{**BENCH_TRAINER, **budget, "progress": cfg.progress})
    runs = {name: apply_recipe(name, stage_cfg, trainer) for name in cfg.recipes}
    if len(set(cfg.recipes)) != len(cfg.recipes):
        raise BenchError("--recipes: a recipe is named twice; name each once")
    for name in cfg.recipes:
        run_dir = cfg.out / RUNS_DIR / _file_label(name)
        if cfg.reuse and cfg.overwrite:
            raise BenchError("--reuse and --overwrite exclude each other: reuse keeps trained runs, overwrite replaces them")
        if cfg.reuse:
            continue
        if not cfg.overwrite and checkpoint.latest_checkpoint(run_dir) is not None:
            raise BenchError(f"{run_dir} already holds a trained run; pass --overwrite, --reuse or choose another --out")
    return Prepared(cfg, info, runs)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch version and threads, whether the CPU computes bf16 natively (what the
    trainer's mixed_precision=auto picks), the GPU if any, and the load average now."""
    from cascade.training.trainer import resolve_mixed_precision

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_bf16_native": resolve_mixed_precision("auto", torch.device("cpu")) == "bf16",
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    if hasattr(os, "getloadavg"):
        info["load_average_1min_at_start"] = round(os.getloadavg()[0], 2)
    return info


# ----------------------------------------------------------------------------------------------- running


@dataclass
class BenchResult:
    """rows: one per (recipe, sampler) plus the reference rows; meta: settings, machine, judge."""

    rows: list[dict[str, Any]]
    meta: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.meta["stage_kind"]


def _train(name: str, stage_cfg: Any, trainer: TrainerConfig, cfg: BenchConfig, log) -> dict[str, Any]:
    from cascade.training.trainer import StageTrainer

    run_dir = cfg.out / RUNS_DIR / _file_label(name)
    record = run_dir / TRAIN_RECORD
    budget = {"minutes": cfg.minutes, "steps": cfg.steps}
    if cfg.reuse and record.exists():
        trained = json.loads(record.read_text())
        if trained.get("budget") != budget:
            raise BenchError(f"--reuse: {run_dir} was trained with budget {trained.get('budget')}, this run asks "
                             f"{budget}; pass the same --minutes/--steps or --overwrite")
        log(f"reusing {cfg.stage} recipe {name}: {trained['train_steps']} steps in {trained['train_seconds']:.0f} s")
        return {k: v for k, v in trained.items() if k != "budget"}
    if cfg.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run = RunConfig(run_dir=str(run_dir), data=DataConfig(root=str(cfg.data), num_workers=cfg.num_workers),
                    trainer=trainer, resume="never", seed=cfg.seed)
    try:
        trainer_obj = StageTrainer(stage_cfg, run, extra_config={"size": cfg.size, "quality_bench_recipe": name})
    except (ValueError, FileNotFoundError) as err:
        raise BenchError(f"recipe {name}: {err}") from None
    log(f"training {cfg.stage} recipe {name} for " +
        (f"{cfg.minutes:g} minutes" if cfg.minutes is not None else f"{cfg.steps} steps"))
    started = time.perf_counter()
    final = trainer_obj.run()
    seconds = time.perf_counter() - started
    trained = {"checkpoint": str(final), "train_steps": trainer_obj.step, "train_seconds": seconds,
               "mixed_precision": trainer_obj.mixed_precision}
    write_atomic(record, json.dumps({**trained, "budget": budget}, indent=1))
    return trained


def _sr_inputs(root: Path, stage_cfg: Any, per_class: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to per_class val images per class: (labels, real images at the stage's size, their low-res inputs)."""
    from cascade.data.loader import iterate_split

    res, low = stage_cfg.resolution, stage_cfg.low_resolution
    taken: dict[int, int] = {}
    labels, high, lows = [], [], []
    for sample in iterate_split(root, "val", [low, res]):
        c = int(sample["y"])
        if taken.get(c, 0) < per_class:
            taken[c] = taken.get(c, 0) + 1
            labels.append(c)
            high.append(sample["images"][res])
            lows.append(sample["images"][low])
    if not labels:
        raise BenchError(f"--data: {root} has no readable val images")
    order = sorted(range(len(labels)), key=lambda i: labels[i])  # grouped by class, stable
    return (torch.tensor([labels[i] for i in order]), torch.stack([high[i] for i in order]),
            torch.stack([lows[i] for i in order]))


def sr_metrics(images: torch.Tensor, real: torch.Tensor, x_low: torch.Tensor) -> dict[str, float]:
    """Teacher-forced SR quality of images (quantised to uint8 first): consistency PSNR with the input (dB),
    PSNR to the real image (dB), detail ratio against the real images."""
    images = uint8_to_float(float_to_uint8(images))
    to_real = peak_signal_noise_ratio((images + 1) / 2, (real + 1) / 2, data_range=1.0, reduction="none",
                                      dim=(1, 2, 3))
    return {"consistency_psnr": consistency_psnr(images, x_low)[1], "psnr": float(to_real.mean()),
            "detail_ratio": detail_ratio(images, real, x_low.shape[-1])}


def _grid_base(images: torch.Tensor, labels: torch.Tensor, per_row: int):
    rows = [images[labels == c][:per_row] for c in labels.unique().tolist()]
    return image_grid(torch.cat(rows), ncol=per_row)


def _grid_sr(images: torch.Tensor, labels: torch.Tensor, real: torch.Tensor, x_low: torch.Tensor, per_row: int):
    """One row per class: (bicubic input, sample, real) for its first per_row images."""
    up = upsample(x_low, images.shape[-1]).clamp(-1, 1)
    tiles = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()[:per_row]
        row = [t for i in idx.tolist() for t in (up[i], images[i], real[i])]
        row += [torch.ones_like(images[0])] * (3 * per_row - len(row))
        tiles += row
    return image_grid(torch.stack(tiles), ncol=3 * per_row)


def _file_label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


def run_benchmark(prepared: Prepared, log: Callable[[str], None] = print) -> BenchResult:
    """Train every recipe, sample every setting, score; writes the runs and sample grids under cfg.out."""
    cfg = prepared.config
    cfg.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    first_stage = next(iter(prepared.runs.values()))[0]
    kind, num_classes = first_stage.kind, first_stage.num_classes
    rows: list[dict[str, Any]] = []
    judge: Judge | None = None
    if kind is StageKind.base:
        judge = get_judge(cfg.data, first_stage.resolution, cfg.judge, log=log)
        log(f"judge {judge.features.name}: {100 * judge.val_accuracy:.1f}% on real val images"
            + (" (cached)" if judge.from_cache else f" (trained in {judge.train_seconds:.0f} s)"))
        labels = torch.arange(num_classes).repeat_interleave(cfg.per_class)
        floor = real_floor(judge, len(labels), seed=cfg.seed)
        rows.append({"recipe": "real images", "sampler": "–", "class_accuracy": judge.val_accuracy,
                     **{k: floor[k] for k in ("fd", "kid_mean", "kid_std", "precision", "recall")}, "reference": True})
        real = x_low = None
    else:
        labels, real, x_low = _sr_inputs(cfg.data, first_stage, cfg.per_class)
        bicubic = upsample(x_low, first_stage.resolution).clamp(-1, 1)
        rows.append({"recipe": "bicubic", "sampler": "–", "nfe_per_image": 0.0, **sr_metrics(bicubic, real, x_low),
                     "reference": True})
    for name, (stage_cfg, trainer) in prepared.runs.items():
        trained = _train(name, stage_cfg, trainer, cfg, log)
        _, model, diffusion = checkpoint.load_stage(trained["checkpoint"], device=device)
        for setting in cfg.samplers:
            log(f"sampling {name} with {setting.label} ({len(labels)} images)")
            started = time.perf_counter()
            images, nfe = sample_images(model, diffusion, stage_cfg, setting, labels, x_low, seed=cfg.seed,
                                        batch_size=cfg.sample_batch, device=device)
            seconds = time.perf_counter() - started
            grid_path = cfg.out / f"grid-{_file_label(name)}-{_file_label(setting.label)}.png"
            if kind is StageKind.base:
                metrics = score(judge, images, labels, seed=cfg.seed, cas=cfg.cas)
                _grid_base(images, labels, min(cfg.per_class, 10)).save(grid_path)
            else:
                metrics = sr_metrics(images, real, x_low)
                _grid_sr(images, labels, real, x_low, min(cfg.per_class, 3)).save(grid_path)
            rows.append({"recipe": name, "sampler": setting.label, "sampler_name": setting.sampler,
                         "steps": setting.steps, "w": stage_cfg.sampling.w if setting.w is None else setting.w,
                         "eta": setting.eta, "guidance_interval": (stage_cfg.sampling.guidance_interval
                                                                   if setting.guidance_interval is None
                                                                   else list(setting.guidance_interval)),
                         "aug_level": (stage_cfg.sampling.aug_level if setting.aug_level is None
                                       else setting.aug_level) if kind is StageKind.sr else None,
                         **trained, "nfe_per_image": nfe, "sample_seconds": seconds,
                         **{k: v for k, v in metrics.items() if k not in ("num_real", "num_fake")},
                         "grid": grid_path.name})
    machine["torch_threads_at_end"] = torch.get_num_threads()
    if hasattr(os, "getloadavg"):
        machine["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    meta = {"stage": cfg.stage, "stage_kind": kind, "size": cfg.size, "data": str(cfg.data),
            "dataset": {"class_names": prepared.info["class_names"], "counts": {
                s: prepared.info["counts"][s]["total"] for s in ("train", "val")}},
            "budget": {"minutes": cfg.minutes} if cfg.minutes is not None else {"steps": cfg.steps},
            "samples": {"num_images": len(labels), "per_class": cfg.per_class, "seed": cfg.seed},
            "trainer_common": {k: v for k, v in BENCH_TRAINER.items() if k not in ("keep_last", "log_every")},
            "recipes": {n: {"description": r.description, "stage": dict(r.stage), "trainer": dict(r.trainer)}
                        for n, r in ((n, resolve_recipe(n)) for n in cfg.recipes)},
            "machine": machine, "device": str(device),
            "judge": None if judge is None else judge.describe(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    return BenchResult(rows, meta)


__all__ = ["BENCH_TRAINER", "RECIPES", "BenchConfig", "BenchError", "BenchResult", "Recipe", "SamplerSetting",
           "apply_recipe", "machine_info", "main_settings", "parse_samplers", "prepare", "run_benchmark",
           "sample_images", "sr_metrics"]


def main_settings(args_recipes: str | None, samplers: str, default_w: float) -> tuple[list[str], list[SamplerSetting]]:
    """(recipe names, sampler settings) from the command line's texts (None: every recipe in RECIPES)."""
    names = list(DEFAULT_RECIPES) if args_recipes is None else [n.strip() for n in args_recipes.split(",")]
    for n in names:
        resolve_recipe(n)
    return names, parse_samplers(samplers, default_w)

