"""Train one stage of the cascade (a hydra app; configuration in configs/train.yaml).

    python tools/train_stage.py stage=sr64 size=tiny data.root=data/shards trainer.max_steps=1000
    torchrun --nproc_per_node 2 tools/train_stage.py stage=base32 data.root=data/shards
    accelerate launch --multi_gpu --num_processes 2 tools/train_stage.py stage=base32 data.root=data/shards
    python tools/train_stage.py stage=sr64 data.root=data/shards --cfg job --resolve   # print the config

Several processes train data-parallel on GPUs, or on CPU with gloo (torchrun, or accelerate launch
--multi_gpu: accelerate's --cpu launches a single process).

Resumes from the newest checkpoint in run_dir (default runs/<stage>) unless resume=never or a path;
prints the final checkpoint's folder. Configuration errors print one line on stderr and exit with 2;
a run stopped by non-finite losses exits with 1.
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cascade.trainer_config import RunConfig


def _drop_nulls(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _drop_nulls(v)
            if v:
                out[k] = v
        elif v is not None:
            out[k] = v
    return out


def build_run(cfg: DictConfig) -> tuple[str, str, dict[str, Any], RunConfig]:
    """(stage name, size, stage overrides, RunConfig) from the composed configuration; paths made absolute."""
    if OmegaConf.is_missing(cfg.data, "root"):
        raise ValueError("data.root is required: data.root=DIR, a shard folder written by tools/make_shards.py")
    c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    stage = dict(c["stage"])
    name = stage.pop("name")
    data = {**c["data"], "root": to_absolute_path(str(c["data"]["root"]))}
    resume = str(c["resume"])
    if resume not in ("auto", "never"):
        resume = to_absolute_path(resume)
    run = RunConfig.from_dict({"run_dir": to_absolute_path(str(c["run_dir"])), "resume": resume, "seed": c["seed"],
                               "trainer": c["trainer"], "data": data})
    return name, str(c["size"]), _drop_nulls(stage), run


@hydra.main(version_base=None, config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        name, size, overrides, run = build_run(cfg)
        import stages
        from cascade.data import read_dataset_info
        from cascade.train import StageTrainer

        num_classes = len(read_dataset_info(run.data.root)["class_names"])
        stage = stages.get_stage(name, size, num_classes)
        if overrides:
            stage = stage.with_overrides(overrides)
        trainer = StageTrainer(stage, run, extra_config={"size": size, "stage_overrides": overrides})
    except (ValueError, FileNotFoundError, OmegaConfBaseException) as err:
        print(f"train_stage: error: {err}", file=sys.stderr)
        sys.exit(2)
    from cascade.train import NonFiniteLossError

    try:
        final = trainer.run()
    except NonFiniteLossError as err:
        print(f"train_stage: {err}", file=sys.stderr)
        sys.exit(1)
    if trainer.accelerator.is_main_process:
        print(f"final checkpoint: {final}")


if __name__ == "__main__":
    main()
