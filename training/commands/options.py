"""Options shared by the commands, and how a config file and flags become settings.

Every setting is defined once, as a field of a config dataclass (DataConfig, TrainConfig,
ExportConfig, NightlyConfig) with a docstring. `setting()` turns a field into a typer option
whose help is that docstring and whose shown default is the field's default; the option itself
defaults to None, meaning "not given": the config file's value, else the dataclass default.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import tomllib
from functools import cache
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml

from training.config import TrainConfig
from training.data import DataConfig
from training.export import ExportConfig

T = TypeVar("T")


class CliError(Exception):
    """A bad flag, config file or argument; the message names it. Exit code 2."""


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring (the string literal right under it), on one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def field_default(cls: type, name: str) -> Any:
    """A dataclass field's default value (its factory called for mutable defaults)."""
    spec = {f.name: f for f in dataclasses.fields(cls)}[name]
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


# (config class, field) -> its command-line flags, for the settings tables in docs/.
FLAGS: dict[tuple[type, str], tuple[str, ...]] = {}


def setting(cls: type, name: str, *flags: str, **kwargs: Any) -> Any:
    """A typer option for field `name` of `cls`: --name-with-dashes unless flags are given."""
    default = field_default(cls, name)
    kwargs.setdefault("show_default", "none" if default is None else str(default))
    flags = flags or (f"--{name.replace('_', '-')}",)
    FLAGS.setdefault((cls, name), flags)
    return typer.Option(*flags, help=field_docs(cls)[name], **kwargs)


ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config file (JSON/YAML/TOML); flags override it."),
]
# Data
SourceOpt = Annotated[str | None, setting(DataConfig, "source", "--data")]
FormatOpt = Annotated[str | None, setting(DataConfig, "format")]
UserColOpt = Annotated[str | None, setting(DataConfig, "user_col")]
ItemColOpt = Annotated[str | None, setting(DataConfig, "item_col")]
TimeColOpt = Annotated[str | None, setting(DataConfig, "time_col")]
MinCountOpt = Annotated[int | None, setting(DataConfig, "min_count")]
SplitSeedOpt = Annotated[int | None, setting(DataConfig, "split_seed")]
SynthUsersOpt = Annotated[int | None, setting(DataConfig, "synthetic_users")]
# Training
ModelOpt = Annotated[str | None, setting(TrainConfig, "model_type", "--model")]
DimOpt = Annotated[int | None, setting(TrainConfig, "dim")]
InterestsOpt = Annotated[int | None, setting(TrainConfig, "num_interests", "--interests", "-K")]
SeqLenOpt = Annotated[int | None, setting(TrainConfig, "seq_len")]
BetaOpt = Annotated[float | None, setting(TrainConfig, "beta")]
LambdaOpt = Annotated[float | None, setting(TrainConfig, "rr_lambda")]
RoutingGradOpt = Annotated[
    bool | None, setting(TrainConfig, "routing_grad", "--routing-grad/--no-routing-grad")
]
NegOpt = Annotated[int | None, setting(TrainConfig, "num_negatives", "--negatives")]
BatchOpt = Annotated[int | None, setting(TrainConfig, "batch_size")]
LrOpt = Annotated[float | None, setting(TrainConfig, "lr")]
WdOpt = Annotated[float | None, setting(TrainConfig, "weight_decay")]
ItersOpt = Annotated[int | None, setting(TrainConfig, "max_iters")]
EvalEveryOpt = Annotated[int | None, setting(TrainConfig, "eval_every")]
PatienceOpt = Annotated[int | None, setting(TrainConfig, "patience")]
SeedOpt = Annotated[int | None, setting(TrainConfig, "seed")]
DeviceOpt = Annotated[str | None, setting(TrainConfig, "device")]
AmpOpt = Annotated[bool | None, setting(TrainConfig, "amp", "--amp/--no-amp")]
CompileOpt = Annotated[bool | None, setting(TrainConfig, "compile", "--compile/--no-compile")]
# Export
FactoryOpt = Annotated[str | None, setting(ExportConfig, "index_factory")]
SearchParamsOpt = Annotated[str | None, setting(ExportConfig, "search_params")]


def read_config(path: Path | None) -> dict[str, Any]:
    """A config file's sections (data:, train:, export:, nightly:); {} without a file."""
    if path is None:
        return {}
    if not path.is_file():
        raise CliError(f"--config: {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise CliError(f"--config: cannot parse {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CliError(f"--config: {path} must hold a mapping")
    return data


def settings(cls: type[T], config: dict[str, Any], section: str, **flags: Any) -> T:
    """Dataclass from a config section, overridden by the flags that were given (not None)."""
    values = dict(config.get(section, {}))
    values.update({k: v for k, v in flags.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise CliError(f"--config: unknown {section} setting(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise CliError(f"invalid {section} settings: {exc}") from None


def echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))
