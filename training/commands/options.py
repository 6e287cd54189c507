"""Options shared by the commands, and how a config file and flags become settings.

Every setting is defined once, as a field of a config dataclass (DataConfig, TrainConfig,
ExportConfig, NightlyConfig) with a docstring. `setting()` turns a field into a typer option
whose help is that docstring and whose shown default is the field's default; the option itself
defaults to None, meaning "not given": the config file's value, else the dataclass default.
`config_options()` gives a command one such option per field of a class.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import inspect
import json
import math
import textwrap
import tomllib
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml

from training.config import TrainConfig

T = TypeVar("T")


class CliError(Exception):
    """A bad flag, config file or argument; the message names it. Exit code 2."""


@functools.cache
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


def config_options(
    cls: type, section: str, only: tuple[str, ...] | None = None, **flags: tuple[str, ...]
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: give a command one option per field of the config class `cls`.

    Each option comes from `setting()`: --field-name (or the names in `flags`), the field's type,
    docstring and default; booleans get --x/--no-x. The command declares a keyword parameter
    `<section>_flags` and receives in it the fields given on the command line, {field: value}.
    `only` limits the options to some fields.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if only is None or f.name in only]

    def annotation(name: str) -> Any:
        kind = hints[name]
        kind = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        dashed = name.replace("_", "-")
        decls = flags.get(name) or (
            (f"--{dashed}/--no-{dashed}",) if kind is bool else (f"--{dashed}",)
        )
        return Annotated[kind | None, setting(cls, name, *decls)]

    def decorate(command: Callable[..., T]) -> Callable[..., T]:
        receiver = f"{section}_flags"
        signature = inspect.signature(command, eval_str=True)
        kept = [p for p in signature.parameters.values() if p.name != receiver]
        added = [
            inspect.Parameter(
                f"{section}_{name}",
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=annotation(name),
            )
            for name in names
        ]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> T:
            given = {name: kwargs.pop(f"{section}_{name}") for name in names}
            kwargs[receiver] = {k: v for k, v in given.items() if v is not None}
            return command(**kwargs)

        wrapper.__signature__ = signature.replace(parameters=kept + added)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in kept + added}
        return wrapper

    return decorate


ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config file (JSON/YAML/TOML); flags override it."),
]
DeviceOpt = Annotated[str | None, setting(TrainConfig, "device")]


SECTIONS = ("data", "train", "export", "nightly")


def read_config(path: Path | None) -> dict[str, Any]:
    """A config file's sections (data:, train:, export:, nightly:), each a mapping ({} for a
    section left empty); {} without a file."""
    if path is None:
        return {}
    if not path.is_file():
        raise CliError(
            f"--config: {path} " + ("is a directory" if path.is_dir() else "does not exist")
        )
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:  # UnicodeDecodeError is a ValueError
        raise CliError(f"--config: cannot parse {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CliError(f"--config: {path} must hold a mapping")
    # A misspelt section (trian:) was ignored, and the run trained with the defaults.
    if unknown := [str(key) for key in data if key not in SECTIONS]:
        raise CliError(
            f"--config: {path}: unknown section(s) {', '.join(unknown)}; "
            f"the sections are {', '.join(SECTIONS)}"
        )
    for section in SECTIONS:
        if data.get(section) is None:
            data.pop(section, None)  # `export:` with every line commented out
        elif not isinstance(data[section], dict):
            raise CliError(
                f"--config: {path}: the {section}: section must be a mapping of settings, "
                f"not {data[section]!r}"
            )
    return data


def settings(cls: type[T], config: dict[str, Any], section: str, **flags: Any) -> T:
    """Dataclass from a config section, overridden by the flags that were given (not None)."""
    values = dict(config.get(section, {}))
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return cls(**checked(cls, values, section))
    except (TypeError, ValueError) as exc:
        raise CliError(f"invalid {section} settings: {exc}") from None


def checked(cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    """`values` for fields of the dataclass `cls`, each checked against its field's type: a
    config file can hold anything (`dim: 8.5`, `amp: "no"`), and typer lets NaN and inf through
    float flags. Numbers must be finite; `1e-3`, which YAML reads as a string, is a float, and
    a whole float (`1.0e+6`) may stand for an int. A name that is no field is an error too."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CliError(f"--config: unknown {section} setting(s) {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    return {
        name: _checked(hints[name], value, cls, name, section) for name, value in values.items()
    }


def _checked(kind: Any, value: Any, cls: type, name: str, section: str) -> Any:
    def bad(expected: str) -> CliError:
        flag = FLAGS.get((cls, name), ("",))[0].split("/")[0]
        where = f"{flag}, or " if flag else ""
        return CliError(
            f"{name} ({where}`{section}: {name}` in --config) must be {expected}, not {value!r}"
        )

    options = typing.get_args(kind)
    if type(None) in options:
        if value is None:
            return None
        kind = next(t for t in options if t is not type(None))
    if kind is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if kind is Path:
        if not isinstance(value, str | Path):
            raise bad("a path")
        return value
    if kind not in (int, float):
        return value
    number = value
    if isinstance(number, str):
        with contextlib.suppress(ValueError):
            number = float(number)
    if isinstance(number, bool) or not isinstance(number, int | float):
        raise bad("a whole number" if kind is int else "a number")
    if not math.isfinite(number):
        raise bad("a finite number")
    if kind is float:
        return float(number)
    if isinstance(number, float) and not number.is_integer():
        raise bad("a whole number")
    return int(number)


def echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))
