"""One command-line convention for every hf_dino command.

Arguments are dataclasses with a help string per field, parsed by transformers'
`HfArgumentParser` with a few additions:

- `--config FILE` (YAML or JSON) sets defaults; flags on the command line override them, and
  `--help` shows the defaults in force (the config's where it sets them).
- Booleans: a bare `--flag` means true; `--flag false` and `--no_flag` mean false.
- Tuple fields take their fixed number of values (`--global_crops_scale 0.4 1.0`).
- Hugging Face spellings beside the reference's come from each field's `aliases` metadata
  (`--learning_rate` for `--lr`, `--model_name_or_path` for `--model`, ...).
- A bad value exits with code 2 and one line naming the flag, the value and what is allowed,
  before anything is written. A dataclass's `__post_init__` checks values and raises
  ValueError; `usage_error` does the same for checks a command makes after parsing.

    @dataclass
    class Arguments:
        model: str = field(metadata={"help": "backbone folder or Hub id", "aliases": ["--model_name_or_path"]})
        k: list[int] = field(default_factory=lambda: [20], metadata={"help": "neighbours"})

    (args,) = parse_args(Arguments, argv=argv, description=__doc__)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser

from .data import FALLBACK_VAL_SPLITS, first_examples, load_dataset_dict, select_split

CONFIG_FLAG = "--config"


def usage_error(message: str) -> NoReturn:
    """Print `error: message` (one line, no traceback) and exit with code 2."""
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in force."""


_TYPE_HINTS = {"invalid int value": "an integer", "invalid float value": "a number"}


class DinoArgumentParser(HfArgumentParser):
    """`HfArgumentParser` with tuple fields, `--no_X` for every boolean and one-line errors."""

    def __init__(self, dataclass_types, description: str | None = None, prog: str | None = None):
        super().__init__(dataclass_types, description=description, prog=prog, formatter_class=HelpFormatter,
                         allow_abbrev=False)
        # HfArgumentParser also adds `--a-b` for `--a_b`: one spelling keeps --help and errors readable
        for action in self._actions:
            hyphenated = [o for o in action.option_strings if o.startswith("--") and "-" in o[2:]]
            for option in hyphenated:
                action.option_strings.remove(option)
                del self._option_string_actions[option]

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        metadata = dict(field.metadata)
        aliases = metadata.pop("aliases", [])
        aliases = [aliases] if isinstance(aliases, str) else list(aliases)
        hint = field.type
        optional_args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) \
                and len(optional_args) == 1:
            hint = optional_args[0]
        if typing.get_origin(hint) is tuple:
            element_types = typing.get_args(hint)
            parser.add_argument(f"--{field.name}", *aliases, nargs=len(element_types), type=element_types[0],
                                default=field.default, metavar=field.name.upper(), **metadata)
            return
        HfArgumentParser._parse_dataclass_field(parser, field)
        if hint is bool and field.default is not True:  # HfArgumentParser adds --no_X only for default True
            parser.add_argument(f"--no_{field.name}", action="store_false", dest=field.name,
                                help=f"same as --{field.name} false")

    def error(self, message: str) -> NoReturn:
        for marker, expected in _TYPE_HINTS.items():
            if marker in message:
                message = f"{message} (expected {expected})"
        usage_error(f"{message} (see {self.prog} --help)")


def _read_config(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        usage_error(f"{CONFIG_FLAG} {path}: no such file; give a YAML or JSON file of flag: value")
    try:
        with open(path) as handle:
            values = json.load(handle) if path.endswith(".json") else yaml.safe_load(handle)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        usage_error(f"{CONFIG_FLAG} {path}: not valid YAML/JSON ({str(error).splitlines()[0]})")
    if values is None:
        return {}
    if not isinstance(values, dict):
        usage_error(f"{CONFIG_FLAG} {path}: must be a mapping of flag: value")
    return values


def flag_destinations(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every spelling (`lr`, `learning_rate`, `no_x`, ...) -> the field it sets."""
    names = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and not option.startswith("--no_"):
                names[option[2:].replace("-", "_")] = action.dest
    return names


def build_parser(*dataclass_types: type, description: str | None = None, prog: str | None = None,
                 config_defaults: dict[str, Any] | None = None) -> DinoArgumentParser:
    """The parser of `dataclass_types` plus `--config`, with `config_defaults` as defaults."""
    parser = DinoArgumentParser(list(dataclass_types), description=description, prog=prog)
    parser.add_argument(CONFIG_FLAG, default=None, metavar="FILE",
                        help="YAML or JSON file of defaults (flag: value); command-line flags override it")
    if config_defaults:
        names = flag_destinations(parser)
        unknown = sorted(key for key in config_defaults if key not in names)
        if unknown:
            usage_error(f"unknown key(s) in the config: {', '.join(unknown)}; "
                        f"valid keys: {', '.join(sorted(set(names.values()) - {'config'}))}")
        parser.set_defaults(**{names[key]: value for key, value in config_defaults.items()})
    for action in parser._actions:  # `--no_X` shares X's destination: X's action alone holds the default
        if any(option.startswith("--no_") for option in action.option_strings):
            action.default = argparse.SUPPRESS
    return parser


def config_path_from_argv(argv: Sequence[str]) -> str | None:
    """The value of `--config FILE` / `--config=FILE` in `argv`, if any."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument(CONFIG_FLAG, default=None)
    known, _ = pre.parse_known_args(list(argv))
    return known.config


def parse_args(*dataclass_types: type, argv: Sequence[str] | None = None, description: str | None = None,
               prog: str | None = None, default_config: str | Path | None = None,
               positional: str | None = None) -> tuple:
    """Parse `argv` (default: sys.argv[1:]) into one instance per dataclass type.

    Precedence: the dataclasses' defaults < `default_config` (used when no `--config` is given)
    < `--config FILE` < command-line flags. Bad values exit with code 2 and one line.
    `positional`: a field that may also be given as the first, unflagged argument
    (`push_to_hub.py OUTPUT_DIR ...` = `push_to_hub.py --output_dir OUTPUT_DIR ...`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if positional and argv and not argv[0].startswith("-"):
        argv = [f"--{positional}", *argv]
    config_path = config_path_from_argv(argv) or (str(default_config) if default_config else None)
    config_defaults = _read_config(config_path) if config_path else None
    parser = build_parser(*dataclass_types, description=description, prog=prog, config_defaults=config_defaults)
    namespace = parser.parse_args(argv)
    namespace.config = config_path
    instances = []
    for dataclass_type in dataclass_types:
        names = {f.name for f in dataclasses.fields(dataclass_type) if f.init}
        values = {name: _as_declared(dataclass_type, name, getattr(namespace, name)) for name in names}
        try:
            instances.append(dataclass_type(**values))
        except ValueError as error:
            usage_error(str(error).replace("\n", " "))
    return tuple(instances)


def _as_declared(dataclass_type: type, name: str, value: Any) -> Any:
    """Lists from argparse/YAML become tuples for tuple fields."""
    hint = typing.get_type_hints(dataclass_type)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and typing.get_origin(args[0]) is tuple:
        hint = args[0]
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def model_field(required: bool = True, help: str = "backbone folder (teacher_backbone/), DinoModel folder (dino/) "
                                                  "or Hub id such as facebook/dino-vits16") -> Any:
    """The `--model` flag of every evaluation, with its Hugging Face spelling `--model_name_or_path`."""
    metadata = {"help": help, "aliases": ["--model_name_or_path"]}
    return field(metadata=metadata) if required else field(default=None, metadata=metadata)


@dataclass
class DataArguments:
    """The data arguments of every command that reads a 🤗 dataset: the same flags, defaults and
    split fallback (validation, then test, val, valid) in pretraining and every evaluation."""

    dataset_name: str | None = field(default=None, metadata={
        "help": "Hub dataset id, local folder (image folder, or parquet/arrow files named by split) or file glob; "
                "default: the embedded CIFAR-10 demo sample"})
    dataset_config_name: str | None = field(default=None, metadata={
        "help": "configuration of a Hub dataset (its 'name' in datasets.load_dataset)"})
    train_split: str = field(default="train", metadata={"help": "split of the memory bank / training images"})
    val_split: str = field(default="validation", metadata={
        "help": f"held-out split; when absent, the first of {', '.join(FALLBACK_VAL_SPLITS[1:])} that exists"})
    image_column: str = field(default="image", metadata={"help": "column holding the images"})
    label_column: str = field(default="label", metadata={"help": "column holding the class labels"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use the first N training images only"})
    max_val_samples: int | None = field(default=None, metadata={"help": "use the first N held-out images only"})

    def __post_init__(self) -> None:
        for name in ("max_train_samples", "max_val_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} {value}: must be >= 1 (or unset for all)")


@dataclass
class SearchRunArguments:
    """How an image-search evaluation runs (retrieval, copy detection): feature cache, decoding,
    device and result file."""

    features_cache: str | None = field(default=None, metadata={
        "help": "folder of safetensors feature files: reused when model, preprocessing and file list match"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader processes decoding images"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda when available, else cpu)"})
    output_json: str | None = field(default=None, metadata={"help": "write the result JSON here (it is also printed)"})

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"--num_workers {self.num_workers}: must be >= 0")


def load_evaluation_splits(data: DataArguments):
    """(train split, held-out split) of `data.dataset_name`, capped by --max_*_samples."""
    try:
        dataset_dict = load_dataset_dict(data.dataset_name, config_name=data.dataset_config_name)
    except (FileNotFoundError, ValueError) as error:
        usage_error(f"--dataset_name {data.dataset_name}: {str(error).splitlines()[0]}")
    train_split = select_split(dataset_dict, data.train_split)
    val_split = select_split(dataset_dict, data.val_split, fallbacks=FALLBACK_VAL_SPLITS)
    if data.max_train_samples is not None:
        train_split = first_examples(train_split, data.max_train_samples)
    if data.max_val_samples is not None:
        val_split = first_examples(val_split, data.max_val_samples)
    return train_split, val_split


def emit_json(result: dict, output_json: str | None) -> None:
    """Print the result and write it to `output_json` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if output_json:
        Path(output_json).parent.mkdir(parents=True, exist_ok=True)
        with open(output_json, "w") as handle:
            handle.write(text + "\n")
