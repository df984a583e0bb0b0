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
from collections.abc import Callable

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cascade.config import StageConfig
from cascade.trainer_config import RunConfig
from stages.hydra_store import register

register()


def build_run(cfg: DictConfig, num_classes: Callable[[str], int]) -> tuple[StageConfig, str, RunConfig]:
    """(StageConfig, size, RunConfig) from the composed configuration; paths made absolute. The stage's class
    count, unless set, is ``num_classes(data_root)`` (the shards')."""
    if OmegaConf.is_missing(cfg.data, "root"):
        raise ValueError("data.root is required: data.root=DIR, a shard folder written by tools/make_shards.py")
    data_root = to_absolute_path(str(cfg.data.root))
    c = OmegaConf.to_container(cfg, resolve=True)
    data = {**c["data"], "root": data_root}
    resume = str(c["resume"])
    if resume not in ("auto", "never"):
        resume = to_absolute_path(resume)
    run = RunConfig.from_dict({"run_dir": to_absolute_path(str(c["run_dir"])), "resume": resume, "seed": c["seed"],
                               "trainer": c["trainer"], "data": data})
    stage = c["stage"]
    if OmegaConf.is_missing(cfg.stage, "num_classes"):  # checked after the run settings: they need no data
        stage["num_classes"] = num_classes(data_root)
    return StageConfig.from_dict(stage), str(c["size"]), run


def _shard_classes(root: str) -> int:
    from cascade.data import read_dataset_info

    return len(read_dataset_info(root)["class_names"])


@hydra.main(version_base=None, config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        stage, size, run = build_run(cfg, _shard_classes)
        from cascade.train import StageTrainer

        trainer = StageTrainer(stage, run, extra_config={"size": size})
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
