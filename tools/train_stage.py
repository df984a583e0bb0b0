"""Train one stage of the cascade (a hydra app; configuration in configs/train.yaml).

    python tools/train_stage.py stage=sr64 size=tiny data.root=data/shards trainer.max_steps=1000
    torchrun --nproc_per_node 2 tools/train_stage.py stage=base32 data.root=data/shards
    accelerate launch --multi_gpu --num_processes 2 tools/train_stage.py stage=base32 data.root=data/shards
    python tools/train_stage.py stage=sr64 data.root=data/shards --cfg job --resolve   # print the config

Several processes train data-parallel on GPUs, or on CPU with gloo (torchrun, or accelerate launch
--multi_gpu: accelerate's --cpu launches a single process).

Resumes from the newest readable checkpoint in run_dir (default runs/<stage>) unless resume=never or a
path; prints the final checkpoint's folder. Configuration errors (hydra's own included: unknown keys or
options, override syntax, interpolations) print one line on stderr and exit with 2; a failure during the
run prints one line and exits with 1; Ctrl-C writes a checkpoint at the current step, prints
"interrupted at step N; run the same command to resume" and exits with 130. HYDRA_FULL_ERROR=1 (or
CASCADE_DEBUG=1) shows tracebacks.
"""

from __future__ import annotations

import faulthandler
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cascade.config import StageConfig
from cascade.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Interrupted,
    debug_enabled,
    describe_failure,
    ensure_writable_dir,
    print_error,
)
from cascade.training.trainer_config import RunConfig
from stages.hydra_store import register

register()

PROG = "train_stage"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_NAME = "train"
_NOISE = ("full_key:", "object_type", "reference_type", "See https://hydra.cc", "Config search path", "provider=")


def hydra_error_line(err: BaseException) -> str:
    """One line from hydra's / OmegaConf's multi-line messages: what failed, the valid options, the fix."""
    text = str(err)
    cause = str(err.__cause__ or "")
    if ("is not in struct" in cause or " not in '" in cause) and "To append to your config use" in text:
        key = text.split("'")[1]
        append = text.split("To append to your config use")[1].split()[0]
        return (f"unknown key {key!r}; check its spelling (python tools/train_stage.py --cfg job lists every key), "
                f"or add a new key with {append}")
    full_key = next((ln.split(":", 1)[1].strip() for ln in (text + "\n" + cause).splitlines()
                     if ln.strip().startswith("full_key:")), "")
    lines, options, in_options = [], [], False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("Config search path"):
            break
        if not line or line.startswith(_NOISE):
            continue
        if line.startswith("Available options in"):
            in_options = True
        elif in_options:
            options.append(line)
        else:
            lines.append(line.rstrip("."))
    if text.startswith("Error merging override") and cause:  # the reason is in the cause: the value's type
        lines.append(next(ln.strip() for ln in cause.splitlines() if ln.strip()))
    message = "; ".join(lines)
    if options:
        message += f"; valid options: {', '.join(options)}"
    if full_key and full_key not in message:
        message = f"{full_key}: {message}"
    return " ".join(message.split())


def _one_line_parser_error(message: str):
    print_error(PROG, f"{message} (overrides are KEY=VALUE, e.g. trainer.max_steps=1000)")
    sys.exit(EXIT_USAGE)


def check_command_line(argv: list[str]) -> None:
    """Compose the configuration as hydra will, and check that run_dir is writable, before hydra runs: its
    composition errors (unknown key or group option, override syntax, interpolation) and an unwritable
    run_dir become one line and exit code 2 instead of hydra's multi-line report (exit 1)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = get_args_parser()
    parser.error = _one_line_parser_error
    args = parser.parse_args(argv)
    if (args.help or args.hydra_help or args.info or args.shell_completion or args.config_path or args.config_dir
            or args.experimental_rerun):
        return  # hydra's own informational modes, or a configuration elsewhere: hydra reports as usual
    try:
        overrides_parser = OverridesParser.create()
        for override in args.overrides:
            try:
                overrides_parser.parse_override(override)
            except HydraException as err:
                raise ValueError(f"override {override!r} is malformed ({hydra_error_line(err)}); see "
                                 "https://hydra.cc/docs/advanced/override_grammar/basic/") from err
        if args.multirun:
            return  # a sweep's jobs are composed (and checked) by hydra one by one
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None, job_name=PROG):
            cfg = compose(args.config_name or CONFIG_NAME, overrides=args.overrides, return_hydra_config=True)
        job = OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"})
        job_values = OmegaConf.to_container(job, resolve=True, throw_on_missing=False)
        str(cfg.hydra.run.dir)  # resolves its interpolations (run_dir, the date)
        choices = cfg.hydra.runtime.choices
        for group in ("preset", "stage_trainer"):  # both follow stage and size; chosen directly they could disagree
            if group == "stage_trainer" and choices.get(group) is None:
                continue  # ~stage_trainer: left out, the size's trainer values as they are
            if choices.get(group) != f"{choices.get('stage')}_{choices.get('size')}":
                raise ValueError(f"{group}={choices.get(group)} does not match stage={choices.get('stage')} "
                                 f"size={choices.get('size')}; choose the stage with stage= and size= only")
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        if debug_enabled():
            raise
        print_error(PROG, hydra_error_line(err))
        sys.exit(EXIT_USAGE)
    if args.cfg is None and isinstance(job_values.get("run_dir"), str):
        try:
            ensure_writable_dir(to_absolute_path(job_values["run_dir"]), "run_dir")
        except ValueError as err:
            print_error(PROG, str(err))
            sys.exit(EXIT_USAGE)


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
    from cascade.data.shard_folder import read_dataset_info

    return len(read_dataset_info(root)["class_names"])


def train(cfg: DictConfig) -> int:
    """Build the trainer (bad configuration → one line, exit code 2) and run it (failure → one line, 1;
    Ctrl-C → checkpoint, one line, 130). Returns the exit code."""
    try:
        stage, size, run = build_run(cfg, _shard_classes)
        from cascade.training.trainer import StageTrainer

        trainer = StageTrainer(stage, run, extra_config={"size": size})
    except (ValueError, FileNotFoundError, OmegaConfBaseException) as err:
        if debug_enabled():
            raise
        print_error(PROG, str(err))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted before training started; run the same command to start", file=sys.stderr)
        return EXIT_INTERRUPTED
    from cascade.training.trainer import NonFiniteLossError

    try:
        final = trainer.run()
    except Interrupted as err:
        if trainer.accelerator.is_main_process:
            print(f"{PROG}: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # a third Ctrl-C: stopped at once, without a checkpoint of this step
        print(f"{PROG}: interrupted without a checkpoint of the current step; run the same command to resume "
              "from the last one", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NonFiniteLossError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as err:  # one line per failure; the traceback with HYDRA_FULL_ERROR=1
        if debug_enabled():
            raise
        rank = trainer.accelerator.process_index
        print_error(PROG if trainer.accelerator.num_processes == 1 else f"{PROG} (rank {rank})",
                    describe_failure(err))
        return EXIT_FAILURE
    if trainer.accelerator.is_main_process:
        print(f"final checkpoint: {final}")
    return 0


@hydra.main(version_base=None, config_path="../configs", config_name=CONFIG_NAME)
def hydra_main(cfg: DictConfig) -> None:
    code = train(cfg)
    if code:
        sys.exit(code)


def main() -> None:
    faulthandler.enable()  # a crash in native code (SIGSEGV, SIGABRT) still says where each thread was
    try:
        check_command_line(sys.argv[1:])
        hydra_main()
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        print(f"{PROG}: interrupted; run the same command to start again", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
