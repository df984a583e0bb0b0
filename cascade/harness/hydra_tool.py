"""The hydra command lines that train a stage (`tools/train_stage.py`, `tools/distill_stage.py`): one `HydraTool`
each (its name, its primary config in configs/, how it builds the run), one edge for both.

Before hydra runs, the command line is checked with hydra's own pieces, none of them private: its documented flags
(https://hydra.cc/docs/advanced/hydra-command-line-flags/), the override parser of `hydra.core` (the one plugins
use) and the compose API. An error is told from the exception's type and attributes (the key, the override, the
valid options), never from the wording of its message. Configuration errors print one line on stderr and exit with
2; a failure during the run one line and 1; Ctrl-C, SIGTERM and SIGUSR1 write a checkpoint at the current step,
print one line and exit with 128 + the signal. HYDRA_FULL_ERROR=1 (or CASCADE_DEBUG=1) shows tracebacks.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from cascade.config import StageConfig
from cascade.errors import (
    EXIT_FAILURE,
    EXIT_USAGE,
    Interrupted,
    debug_enabled,
    describe_failure,
    ensure_writable_dir,
    exit_code,
    interrupted_by,
    print_error,
    signal_of,
    stop_signals_raise,
)
from cascade.locks import FolderLock
from cascade.training.trainer_config import RunConfig

__all__ = [
    "CONFIG_DIR",
    "HydraTool",
    "UsageError",
    "build_distill_run",
    "build_run",
    "check_command_line",
    "error_line",
    "flag_parser",
    "run_training",
    "shard_classes",
    "tool_main",
]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"
INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


@dataclass(frozen=True)
class HydraTool:
    """One training command line: ``prog`` (its name in messages: tools/<prog>.py), ``config_name`` (its primary
    config in configs/) and ``build``, which turns the composed configuration into (StageConfig, size, RunConfig),
    raising ValueError / FileNotFoundError (one line) on a bad setting."""

    prog: str
    config_name: str
    build: Callable[[DictConfig], tuple[StageConfig, str, RunConfig]]


class UsageError(ValueError):
    """A command line that hydra's flags do not parse."""


class _FlagParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(f"{message} (overrides are KEY=VALUE, e.g. trainer.max_steps=1000)")


def flag_parser(prog: str = "train_stage") -> argparse.ArgumentParser:
    """hydra's documented command-line flags (https://hydra.cc/docs/advanced/hydra-command-line-flags/) and the
    overrides: what hydra.main accepts, read here only to tell the overrides from the flags."""
    parser = _FlagParser(prog=prog, add_help=False)
    parser.add_argument("overrides", nargs="*")
    for flag in (("--help", "-h"), ("--hydra-help",), ("--version",), ("--resolve",), ("--run", "-r"),
                 ("--multirun", "-m"), ("--shell-completion", "-sc")):
        parser.add_argument(*flag, action="store_true")
    parser.add_argument("--cfg", "-c", choices=("job", "hydra", "all"))
    for flag in (("--package", "-p"), ("--config-path", "-cp"), ("--config-name", "-cn"), ("--config-dir", "-cd"),
                 ("--experimental-rerun",)):
        parser.add_argument(*flag)
    parser.add_argument("--info", "-i", nargs="?", const="all", choices=INFO_TOPICS)
    return parser


def _first_line(text: object) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def _lines(text: object) -> str:
    return "; ".join(line.strip().rstrip(".") for line in str(text).splitlines() if line.strip())


def error_line(err: BaseException, overrides: list[Override], prog: str = "train_stage") -> str:
    """One line for a composition error, from the exception's type and attributes: an unknown key names the key
    and the override that would add it, a missing group option lists the valid options, an OmegaConf error
    names its key; the message itself is shown, never read."""
    if isinstance(err, OverrideParseException):
        return f"override {err.override!r} is malformed ({_first_line(err.message)}); see {GRAMMAR}"
    if isinstance(err, MissingConfigException):
        return _first_line(err).rstrip(".") + (f"; valid options: {', '.join(err.options)}" if err.options else "")
    cause = err.__cause__
    if isinstance(err, ConfigCompositionException) and isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        key = cause.full_key
        line = next((o.input_line for o in overrides if o.key_or_group == key), None) or f"{key}=VALUE"
        return (f"unknown key {key!r}; check its spelling (python tools/{prog}.py --cfg job lists every key), "
                f"or add a new key with +{line}")
    if isinstance(err, OmegaConfBaseException):
        return _keyed(err.full_key, _first_line(err))
    if isinstance(err, HydraException):
        message = _lines(err)
        if isinstance(cause, OmegaConfBaseException):
            return _keyed(cause.full_key, f"{message}; {_first_line(cause)}")
        return message
    return str(err)


def _keyed(full_key: object, message: str) -> str:
    return message if not full_key or str(full_key) in message else f"{full_key}: {message}"


def check_command_line(argv: list[str], tool: HydraTool) -> None:
    """Compose the configuration as hydra will, and check that run_dir is writable, before hydra runs: a bad
    flag, an override's syntax, a composition error (unknown key or group option, a value of the wrong type,
    an interpolation) and an unwritable run_dir become one line and exit code 2 instead of hydra's
    multi-line report (exit 1)."""
    try:
        args = flag_parser(tool.prog).parse_args(argv)
        modes = [name for name in ("run", "multirun", "cfg", "info", "shell_completion") if getattr(args, name)]
        if len(modes) > 1:
            raise UsageError("give one of --run, --multirun, --cfg, --info and --shell-completion")
    except UsageError as err:
        print_error(tool.prog, str(err))
        sys.exit(EXIT_USAGE)
    if (args.help or args.hydra_help or args.version or args.info or args.shell_completion or args.config_path
            or args.config_dir or args.experimental_rerun):
        return  # hydra's own informational modes, or a configuration elsewhere: hydra reports as usual
    overrides: list[Override] = []
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
        if args.multirun:
            return  # a sweep's jobs are composed (and checked) by hydra one by one
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None, job_name=tool.prog):
            cfg = compose(args.config_name or tool.config_name, overrides=args.overrides, return_hydra_config=True)
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
        print_error(tool.prog, error_line(err, overrides, tool.prog))
        sys.exit(EXIT_USAGE)
    if args.cfg is None and isinstance(job_values.get("run_dir"), str):
        try:
            run_dir = ensure_writable_dir(to_absolute_path(job_values["run_dir"]), "run_dir")
            # A second run on it: refused before hydra writes its logs there (rank 0 of a torchrun run decides).
            FolderLock(run_dir, "run_dir", enabled=os.environ.get("RANK", "0") == "0").check_free()
        except ValueError as err:
            print_error(tool.prog, str(err))
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


def build_distill_run(cfg: DictConfig, preset: Callable[[str, str], dict]) -> tuple[StageConfig, str, RunConfig]:
    """(the student's StageConfig, size, RunConfig) of a distillation job (`tools/distill_stage.py`): the teacher's
    stage made a student by ``distill`` (`cascade.training.distill.student_stage`). ValueError / FileNotFoundError
    (one line) when the teacher is missing or damaged, is a checkpoint of another stage or resolution than
    ``stage=``, or when stage.* settings were changed (they come from the teacher): ``preset(name, size)`` is the
    stage's preset as composed (`stages.hydra_store.preset_node`), to tell them."""
    from cascade import checkpoint
    from cascade.training.distill import student_stage
    from cascade.training.trainer_config import DistillSettings

    if OmegaConf.is_missing(cfg, "teacher"):
        raise ValueError("teacher is required: teacher=RUN, the run folder (or a checkpoint) of the stage to distil, "
                         "trained by tools/train_stage.py")
    c = OmegaConf.to_container(cfg, resolve=True)
    settings = DistillSettings(**c["distill"])
    try:
        teacher_path = checkpoint.resolve_checkpoint(to_absolute_path(str(c["teacher"])))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"teacher: {err}; pass teacher=RUN, a run folder of tools/train_stage.py") from None
    teacher = checkpoint.load_stage_config(teacher_path)
    name, size = c["stage"]["name"], str(c["size"])
    chosen = {k: v for k, v in c["stage"].items() if k != "num_classes"}
    if teacher.name != name:
        raise ValueError(f"teacher {teacher_path} is a {teacher.name} checkpoint ({teacher.resolution}x"
                         f"{teacher.resolution}), not {name}; pass stage={teacher.name} or a teacher of {name}")
    if teacher.resolution != chosen["resolution"] or teacher.low_resolution != chosen["low_resolution"]:
        raise ValueError(f"teacher {teacher_path} generates {teacher.resolution}x{teacher.resolution}"
                         f"{f' from {teacher.low_resolution}x{teacher.low_resolution}' if teacher.low_resolution else ''}"
                         f", stage {name} here {chosen['resolution']}x{chosen['resolution']}; distil a teacher of "
                         "the same resolutions")
    defaults = preset(name, size)
    changed = sorted(k for k in defaults if chosen.get(k) != defaults[k])
    if changed:
        raise ValueError(f"stage.{changed[0]} was changed, but a student's stage settings are its teacher's; drop the "
                         "stage.* overrides (distill.* and trainer.* set how it is distilled)")
    _, _, run = build_run(cfg, lambda root: teacher.num_classes)
    return student_stage(teacher, teacher_path, settings), size, run


def shard_classes(root: str) -> int:
    """The class count of the shard folder ``root`` (its dataset.json)."""
    from cascade.data.shard_folder import read_dataset_info

    return len(read_dataset_info(root)["class_names"])


def run_training(cfg: DictConfig, tool: HydraTool) -> int:
    """Build the trainer (bad configuration → one line, exit code 2) and run it (failure → one line, 1;
    Ctrl-C, SIGTERM, SIGUSR1 → checkpoint, one line, 128 + the signal). Returns the exit code."""
    try:
        stage, size, run = tool.build(cfg)
        from cascade.training.trainer import StageTrainer

        trainer = StageTrainer(stage, run, extra_config={"size": size})
    except (ValueError, FileNotFoundError, OmegaConfBaseException) as err:
        if debug_enabled():
            raise
        print_error(tool.prog, str(err))
        return EXIT_USAGE
    except KeyboardInterrupt as err:
        print(f"{tool.prog}: {interrupted_by(signal_of(err))} before training started; run the same command to start",
              file=sys.stderr)
        return exit_code(signal_of(err))
    except Exception as err:  # set-up failed for another reason (disk, device, process group): one line, 1
        if debug_enabled():
            raise
        print_error(tool.prog, describe_failure(err))
        return EXIT_FAILURE
    from cascade.training.trainer import NonFiniteLossError

    try:
        final = trainer.run()
    except Interrupted as err:
        if trainer.accelerator.is_main_process:
            print(f"{tool.prog}: {err}", file=sys.stderr)
        return exit_code(err.signum)
    except KeyboardInterrupt as err:  # a third signal: stopped at once, without a checkpoint of this step
        print(f"{tool.prog}: {interrupted_by(signal_of(err))} without a checkpoint of the current step; run the same "
              "command to resume from the last one", file=sys.stderr)
        return exit_code(signal_of(err))
    except NonFiniteLossError as err:
        print(f"{tool.prog}: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as err:  # one line per failure; the traceback with HYDRA_FULL_ERROR=1
        if debug_enabled():
            raise
        rank = trainer.accelerator.process_index
        print_error(tool.prog if trainer.accelerator.num_processes == 1 else f"{tool.prog} (rank {rank})",
                    describe_failure(err))
        return EXIT_FAILURE
    if trainer.accelerator.is_main_process:
        print(f"final checkpoint: {final}")
    return 0


def tool_main(tool: HydraTool) -> None:
    """The command line's entry point: check it (`check_command_line`), then run hydra's app on ``tool``'s config
    (`run_training`, exit with its code); a stop signal outside the training loop is one line and 128 + the signal."""

    @hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name=tool.config_name)
    def hydra_main(cfg: DictConfig) -> None:
        code = run_training(cfg, tool)
        if code:
            sys.exit(code)

    faulthandler.enable()  # a crash in native code (SIGSEGV, SIGABRT) still says where each thread was
    try:
        with stop_signals_raise():  # SIGTERM / SIGUSR1 outside the training loop: one line, 128 + signal
            check_command_line(sys.argv[1:], tool)
            hydra_main()
    except KeyboardInterrupt as err:
        if debug_enabled():
            raise
        print(f"{tool.prog}: {interrupted_by(signal_of(err))}; run the same command to start again", file=sys.stderr)
        sys.exit(exit_code(signal_of(err)))
