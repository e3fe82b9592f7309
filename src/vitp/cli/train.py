"""`vitp pretrain` and `vitp export-vit`: stage 1, with upstream's flag names."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path


def _bool(value: str) -> bool:
    """Accept `--bf16` and upstream's HfArgumentParser spelling `--bf16 True`."""
    lowered = str(value).lower()
    if lowered in ("1", "true", "yes", "y"):
        return True
    if lowered in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _add_config_fields(parser: argparse.ArgumentParser) -> None:
    """One flag per PretrainConfig field, typed from its annotation. Flags not given stay out of the
    namespace (SUPPRESS), so that --config values apply unless the command line sets them."""
    from vitp.train.pretrain import PretrainConfig

    hints = typing.get_type_hints(PretrainConfig)
    for field in dataclasses.fields(PretrainConfig):
        base = _flag_type(hints[field.name])
        default = None if field.default is dataclasses.MISSING else field.default
        shown = f" (default: {default})" if default not in (None, "") else ""
        if base is bool:
            parser.add_argument(f"--{field.name}", type=_bool, nargs="?", const=True, default=argparse.SUPPRESS,
                                help=f"true/false{shown}")
        else:
            parser.add_argument(f"--{field.name}", type=base, default=argparse.SUPPRESS, help=shown.strip() or None)


def _flag_type(annotation: object) -> type:
    """``int`` for ``int``, ``str`` for ``str | None``: the type a flag's value is converted to."""
    return next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)


def register(subparsers: argparse._SubParsersAction) -> None:
    pretrain = subparsers.add_parser(
        "pretrain",
        help="ViTP pretraining of an InternVL-style model (one process, torchrun, DeepSpeed or FSDP)",
        description=(
            "Train on a meta JSON of image + conversation data. Flags keep upstream's names; --config reads "
            "them from a YAML or JSON file (flags given on the command line win). TMAug: --TMAug_prob P is "
            "ViTP's flag (drop a fraction P of the image tokens with probability 1-P); --tmaug_prob/--tmaug_ratio/"
            "--tmaug_mode set the three explicitly. Launch on N GPUs with `torchrun --nproc_per_node N -m vitp.cli "
            "pretrain ...`."
        ),
    )
    pretrain.add_argument("--config", help="YAML or JSON file of flag values")
    _add_config_fields(pretrain)
    pretrain.set_defaults(handler=_run_pretrain)


def load_config_file(path: str) -> dict:
    """Settings from a YAML or JSON file, each converted like the flag of the same name (so that
    ``freeze_backbone: "false"`` is False and YAML's string ``2e-5`` is a float)."""
    from vitp.errors import ConfigError
    from vitp.train.pretrain import PretrainConfig

    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--config {path}: cannot read it ({err})") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as err:  # noqa: BLE001 - yaml.YAMLError or json.JSONDecodeError, with the position
        raise ConfigError(f"--config {path}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'} ({err})") from None
    values = values if values is not None else {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of setting names to values, found {type(values).__name__}")
    hints = typing.get_type_hints(PretrainConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(f"{path}: unknown settings {unknown}")
    return {name: _setting(value, hints[name], f"{path}: {name}") for name, value in values.items()}


def _setting(value: object, kind: object, where: str) -> object:
    """One config-file value as the type its flag has; a clear error when it cannot be one."""
    from vitp.errors import ConfigError

    base = _flag_type(kind)
    if value is None:
        if type(None) in typing.get_args(kind):
            return None
        raise ConfigError(f"{where}: a value is required ({base.__name__})")
    try:
        if base is bool:
            return _bool(value)  # the flag's own parser: true/false/yes/no/1/0, YAML booleans too
        if base in (int, float) and isinstance(value, bool):
            raise ValueError("a boolean is not a number")
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("not a whole number")
        return base(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        raise ConfigError(f"{where}: expected {base.__name__}, got {value!r} ({err})") from None


def _run_pretrain(args: argparse.Namespace) -> int:
    from vitp.errors import ConfigError
    from vitp.train.pretrain import PretrainConfig, is_main_process, pretrain

    values = load_config_file(args.config) if args.config else {}
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    values.update({key: value for key, value in vars(args).items() if key in fields})  # the command line wins
    for required in ("meta_path", "output_dir"):
        if not values.get(required):
            raise ConfigError(f"--{required} is required (on the command line or in --config)")
    output = pretrain(PretrainConfig(**values))
    if is_main_process():  # once, not per torchrun process
        print(f"model written to {output} (transformers InternVL directory); loss curve {output / 'loss.png'}")
    return 0
