"""The quality benchmark's recipes: named sets of stage and trainer overrides (`RECIPES`), the trainer settings every
recipe starts from (`BENCH_TRAINER`), a spec's `+KEY=VALUE` changes (`resolve_recipe`) and a recipe applied to a
stage (`apply_recipe`); and `BenchError`, the benchmark's one-line error."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cascade.training.trainer_config import TrainerConfig

__all__ = ["BENCH_TRAINER", "DEFAULT_RECIPES", "RECIPES", "BenchError", "Recipe", "apply_recipe", "resolve_recipe"]

# Trainer settings every recipe starts from (batch 8, lr 2e-4, EMA 0.999, bf16 where native; docs/results/2026-12-01.md);
# a recipe's trainer overrides replace them. Only the final checkpoint is written; the benchmark judges the samples
# itself, so no in-training proxy and no post-hoc EMA snapshots take from the recipe's minutes.
BENCH_TRAINER: dict[str, Any] = {"batch_size": 8, "lr": 2e-4, "warmup_steps": 100, "ema_decay": 0.999,
                                 "ema_warmup": 10.0, "p_uncond": 0.1, "grad_clip": 1.0, "mixed_precision": "auto",
                                 "ckpt_every": 0, "keep_last": 1, "log_every": 100, "sample_every": 0,
                                 "eval_every": 0, "ema_sigma_rels": (), "run_report": False}


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
                  "§3.1; CDM's recipe and the paper presets')",
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

# EDM2's training dynamics (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models"),
# each on v-minsnr5's objective so they compare with it and with `today` (the tiny presets' objective); not in
# DEFAULT_RECIPES. inv_sqrt's t_ref is 1000 steps (the decay acts within a run of a few thousand CPU steps). With
# magnitude-preserving layers lr is 1e-2, the order of EDM2's α_ref: forced weight normalisation stores every
# weight at unit scale, so Adam's step of about lr per weight is a relative change (at 2e-4 they would learn
# about √fan_in times slower than the standard layers at 2e-4: 17× to 34× for this UNet's 3×3 convolutions).
_V_MINSNR5 = RECIPES["v-minsnr5"].stage["diffusion"]
_LOGNORMAL = {"timestep_sampler": "lognormal", "p_mean": -1.2, "p_std": 1.2}
_INV_SQRT = {"lr_schedule": "inv_sqrt", "lr_ref_steps": 1000}
RECIPES.update({
    "edm2-lognormal": Recipe("v-minsnr5 with t drawn from EDM's log-normal noise levels, ln σ ~ N(−1.2, 1.2²) "
                             "(Karras et al. 2022 'EDM' §5, Table 1), not re-weighted to uniform t",
                             {"diffusion": {**_V_MINSNR5, **_LOGNORMAL}}),
    "edm2-invsqrt": Recipe("v-minsnr5 with the learning rate decayed as lr/√max(s/1000, 1) after the warm-up "
                           "(Karras et al. 2024 'EDM2' eq. 16)",
                           {"diffusion": dict(_V_MINSNR5)}, _INV_SQRT),
    "edm2-mp": Recipe("v-minsnr5 with EDM2's magnitude-preserving layers and forced weight normalisation, lr 1e-2 "
                      "(Karras et al. 2024 'EDM2' §2, Configs C, D, F)",
                      {"diffusion": dict(_V_MINSNR5), "unet": {"magnitude_preserving": True}}, {"lr": 1e-2}),
    "edm2-all": Recipe("v-minsnr5 with EDM2's three: log-normal t, magnitude-preserving layers (lr 1e-2) and the "
                       "inverse-square-root decay (Karras et al. 2022 'EDM' Table 1; 2024 'EDM2' §2, eq. 16)",
                       {"diffusion": {**_V_MINSNR5, **_LOGNORMAL}, "unet": {"magnitude_preserving": True}},
                       {"lr": 1e-2, **_INV_SQRT}),
})


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
