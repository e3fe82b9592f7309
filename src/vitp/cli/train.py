"""`vitp pretrain`: stage 1, with upstream's flags.

`vitp pretrain` takes every flag of upstream's trainer (vitp.train.arguments: ModelArguments,
DataTrainingArguments, transformers' TrainingArguments) through ``transformers.HfArgumentParser``, as
upstream does, so that an InternVL or ViTP launch script runs unchanged. The parser is built when the
command runs, not at start-up (it imports transformers).
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    # Every argument goes to HfArgumentParser: '+' as the only prefix keeps argparse from reading
    # '--flag' itself, so the whole command line arrives in `argv`.
    pretrain = subparsers.add_parser(
        "pretrain", prefix_chars="+", add_help=False,
        help="ViTP pretraining of an InternVL-style model, with upstream's flags (one process, torchrun, DeepSpeed or FSDP)",
    )
    pretrain.add_argument("argv", nargs=argparse.REMAINDER)
    pretrain.set_defaults(handler=_run_pretrain)


DESCRIPTION = (
    "Train on a meta JSON of image + conversation data. Every flag of upstream's trainer "
    "(internvl_chat_finetune.py) and of transformers' TrainingArguments is accepted as upstream spells it "
    "(`--bf16 True`, `--evaluation_strategy no`, ...); --config reads flags from a YAML or JSON file and the "
    "command line wins. Launch on N GPUs with `torchrun --nproc_per_node N -m vitp.cli pretrain ...`."
)


def argument_parser():
    """HfArgumentParser over upstream's three argument classes, plus --config."""
    from transformers import HfArgumentParser

    from vitp.train.arguments import ARGUMENT_CLASSES

    parser = HfArgumentParser(ARGUMENT_CLASSES, prog="vitp pretrain", description=DESCRIPTION, exit_on_error=False)
    parser.add_argument("--config", help="YAML or JSON file of flag values (flags on the command line win)")
    parser.add_argument("--no_progress", action="store_true",
                        help="no progress bar (as --disable_tqdm True; the loss lines are still printed). Without a "
                             "terminal (a captured log) there is no bar either way")
    return parser


def load_config_file(path: str, parser=None) -> dict:
    """Settings from a YAML or JSON file, each converted as the flag of the same name converts its
    value (so that ``freeze_backbone: "false"`` is False and YAML's string ``2e-5`` is a float)."""
    from vitp.errors import ConfigError

    parser = parser or argument_parser()
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: cannot read it ({err})") from None
    yaml_file = path.endswith((".yaml", ".yml"))
    try:
        if yaml_file:
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as err:  # noqa: BLE001 - yaml.YAMLError or json.JSONDecodeError, with the position
        raise ConfigError(f"--config {path}: not valid {'YAML' if yaml_file else 'JSON'} ({err})") from None
    values = values if values is not None else {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of setting names to values, found {type(values).__name__}")
    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        hints = {key: difflib.get_close_matches(key, actions, n=1) for key in unknown}
        named = ", ".join(f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") for key, hint in hints.items())
        raise ConfigError(f"{path}: unknown settings {named}")
    return {name: _typed(actions[name], value, f"{path}: {name}") for name, value in values.items()}


def _typed(action: argparse.Action, value: object, where: str) -> object:
    """One config-file value as its flag would read it; a clear error when it cannot be one."""
    from vitp.errors import ConfigError

    if value is None:
        if action.default is None:
            return None
        raise ConfigError(f"{where}: a value is required")
    if isinstance(value, dict) or action.type is None:
        return value
    if isinstance(value, list) and action.nargs in ("+", "*"):
        return [_typed(argparse.Action([], action.dest, type=action.type, default=None), v, where) for v in value]
    kind = getattr(action.type, "__name__", "value")
    try:
        if kind in ("int", "float") and isinstance(value, bool):
            raise ValueError("a boolean is not a number")
        if kind == "int" and isinstance(value, float) and not value.is_integer():
            raise ValueError("not a whole number")
        converted = action.type(str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        raise ConfigError(f"{where}: expected {kind}, got {value!r} ({err})") from None
    if action.choices is not None and converted not in action.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def parse_pretrain_arguments(argv: list[str]):
    """(ModelArguments, DataTrainingArguments, TrainingArguments) from a command line; --config
    values are the defaults the command line overrides, and --no_progress sets disable_tqdm."""
    from vitp.errors import ConfigError

    parser = argument_parser()
    config, _ = _config_option().parse_known_args(argv)
    if config.config:
        parser.set_defaults(**load_config_file(config.config, parser))
    try:
        *arguments, extra = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    except argparse.ArgumentError as err:  # a value its flag cannot read
        raise ConfigError(str(err)) from None
    except ValueError as err:  # unknown flags, or a value a dataclass refused
        message = str(err)
        if "not used by the HfArgumentParser" in message:
            known = [option for action in parser._actions for option in action.option_strings]
            unknown = [arg for arg in argv if arg.startswith("--") and arg.split("=")[0] not in known]
            hints = {arg: difflib.get_close_matches(arg.split("=")[0], known, n=1) for arg in unknown}
            message = "unrecognized arguments: " + ", ".join(
                arg + (f" (did you mean {hint[0]}?)" if hint else "") for arg, hint in hints.items())
        raise ConfigError(message) from None
    if extra.no_progress:
        arguments[-1].disable_tqdm = True
    return arguments


def _config_option() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    return parser


def _run_pretrain(args: argparse.Namespace) -> int:
    from vitp.train.pretrain import is_main_process, pretrain

    if {"-h", "--help"} & set(args.argv):
        argument_parser().print_help()
        return 0
    output = pretrain(*parse_pretrain_arguments(args.argv))
    if is_main_process():  # once, not per torchrun process
        curve = output / "loss.png"
        print(f"model written to {output} (transformers InternVL directory)"
              + (f"; loss curve {curve}" if curve.is_file() else "; no loss was logged, so no loss.png"))
    return 0
