"""hydra's view of the configuration: the stage, trainer and data dataclasses as structured configs.

Every default is defined once, in the dataclasses (`cascade.config`, `cascade.training.trainer_config`) and the
presets (`stages.presets`); this module only shows them to hydra:

- ``train_schema``: the whole `tools/train_stage.py` job (run_dir, resume, seed, size, stage, trainer, data),
  typed by the dataclasses, so an unknown key or a value of the wrong type fails at composition;
  ``distill_schema``: the `tools/distill_stage.py` job, the same plus teacher and distill; ``distill_trainer``:
  what distillation changes in the trainer settings (`cascade.training.trainer_config.DISTILL_TRAINER`).
- group ``stage`` (base32, sr64, …): selects the stage; group ``preset`` (``<stage>_<size>``): the stage's
  full preset at that size, placed at ``stage`` by `configs/train.yaml`'s defaults list
  (``preset: ${stage}_${size}``). Its ``num_classes`` is left missing: the trainer takes it from the shards.
- group ``size`` (`configs/size/*.yaml`): what a size changes in the trainer settings.
- group ``stage_trainer`` (`configs/stage_trainer/<stage>_<size>.yaml`, optional): what one stage at one size
  changes in the trainer settings beyond its size (tiny sr64: lr and EMA, measured by the quality benchmark).

hydra makes frozen dataclasses read-only, and overrides must be able to change every field, so the schema is a
mutable mirror of each dataclass (`schema_of`) with the same fields, types and defaults. Validation stays in the
real dataclasses, which the command line builds from the composed config.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from cascade.config import StageConfig
from cascade.training.trainer_config import DISTILL_TRAINER, DataConfig, DistillSettings, TrainerConfig
from stages.presets import SIZES, STAGE_NAMES, get_stage


@functools.cache
def schema_of(cls: type) -> type:
    """A mutable, unvalidated dataclass with ``cls``'s fields, types and defaults (nested dataclasses mirrored
    too): hydra's structured schema of ``cls``. Required fields become MISSING (``???``)."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            kind = schema_of(kind)
        fields.append((f.name, kind, dataclasses.field(**_default_of(f, kind))))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", fields)


def _default_of(f: dataclasses.Field, kind: Any) -> dict[str, Any]:
    if f.default is not dataclasses.MISSING:
        return {"default": f.default}
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):  # the nested dataclass's own values, in the mirror type
            return {"default_factory": functools.partial(kind, **_plain_fields(value))}
        return {"default_factory": f.default_factory}
    return {"default": MISSING}


def _plain_fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def train_schema() -> type:
    """The schema of the whole training job."""
    return dataclasses.make_dataclass("TrainJobSchema", [
        ("run_dir", str, dataclasses.field(default="runs/${stage.name}")),  # relative: from the working directory
        ("resume", str, dataclasses.field(default="auto")),  # auto | never | a checkpoint path
        ("seed", int, dataclasses.field(default=0)),
        ("size", str, dataclasses.field(default="tiny")),  # set by the size group: tiny | paper
        ("stage", schema_of(StageConfig), dataclasses.field(default=MISSING)),
        ("trainer", schema_of(TrainerConfig), dataclasses.field(default_factory=schema_of(TrainerConfig))),
        ("data", schema_of(DataConfig), dataclasses.field(default_factory=schema_of(DataConfig))),
    ])


def distill_schema() -> type:
    """The schema of the whole distillation job (`tools/distill_stage.py`): the training job's fields, the teacher
    (required: a run folder or checkpoint of `tools/train_stage.py`) and the distillation settings."""
    return dataclasses.make_dataclass("DistillJobSchema", [
        *((f.name, f.type, f) for f in dataclasses.fields(train_schema())),
        ("teacher", str, dataclasses.field(default=MISSING)),
        ("distill", schema_of(DistillSettings), dataclasses.field(default_factory=schema_of(DistillSettings))),
    ])


def preset_node(name: str, size: str) -> dict[str, Any]:
    """The preset of stage ``name`` at ``size`` as hydra sees it: every field but ``num_classes``."""
    node = get_stage(name, size).to_dict()
    del node["num_classes"]
    return node


def register(store: ConfigStore | None = None) -> None:
    """Register the schema and the stage groups (idempotent); call before composing `configs/train.yaml`."""
    store = store or ConfigStore.instance()
    store.store(name="train_schema", node=train_schema())
    store.store(name="distill_schema", node=distill_schema())
    store.store(name="distill_trainer", node={"trainer": dict(DISTILL_TRAINER)})
    for name in STAGE_NAMES:
        store.store(group="stage", name=name, node={})
        for size in SIZES:
            store.store(group="preset", name=f"{name}_{size}", node=preset_node(name, size), package="stage")
