"""Configuration in one place.

Each command's settings are a frozen dataclass; ``add_arguments`` turns its fields into command
line flags (``--field-name``, help from the field's ``metadata["help"]``) and ``from_args``
builds the dataclass back, so the CLI, config files and code share one definition. Environment
variables are read here and nowhere else (``env``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: Environment variables the package reads, with what they mean.
ENV_VARS = {
    "TETRISERVE_URL": "address of the scheduler service clients talk to (default http://127.0.0.1:8189)",
    "TETRISERVE_TOKEN": "bearer token for a service that listens beyond loopback",
    "TETRISERVE_HOME": "folder for caches: tiny demo models, profiles, the service lock file, the job history "
                       "(default ~/.cache/comfy_tetriserve)",
    "TETRISERVE_AUTOSTART": "1 to let clients start a local service when none answers",
    "TETRISERVE_COMFYUI": "path of a ComfyUI checkout for the end-to-end tests",
    "TETRISERVE_COMFYUI_PYTHON": "python of a venv that can run that ComfyUI",
}


def env(name: str, default: str | None = None) -> str | None:
    """Read one of the package's environment variables (listed in ENV_VARS)."""
    if name not in ENV_VARS:
        raise KeyError(f"{name} is not one of the package's environment variables")
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def home_dir() -> Path:
    """The cache folder (created on demand)."""
    path = Path(env("TETRISERVE_HOME") or Path.home() / ".cache" / "comfy_tetriserve")
    path.mkdir(parents=True, exist_ok=True)
    return path


def field(default: Any = dataclasses.MISSING, *, help: str = "", default_factory: Any = dataclasses.MISSING,
          flag: str | None = None, choices: tuple | None = None) -> Any:
    """A dataclass field with CLI metadata."""
    meta = {"help": help, "flag": flag, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[Any, bool, bool]:
    """(element type, is_optional, is_sequence) of a field annotation."""
    origin = typing.get_origin(tp)
    optional = False
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return (args[0] if args else str), optional, True
    return tp, optional, False


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional, seq = _base_type(hints[f.name])
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata.get("help", "")}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kwargs["default"] = argparse.SUPPRESS
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp if tp in (int, float, str) else str
            if seq:  # repeated flags add up: --model a=X --model b=Y (or --model a=X b=Y)
                kwargs["nargs"] = "+" if not optional else "*"
                kwargs["action"] = "extend"
            kwargs["metavar"] = f.name.upper()
        if default not in (None, (), [], "") and kwargs["help"] is not None:
            kwargs["help"] = f"{kwargs['help']} (default: {_fmt(default)})"
        parser.add_argument(flag, **kwargs)


def _fmt(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return str(value)


def from_mapping(cls: type[T], values: Mapping[str, Any], base: T | None = None) -> T:
    """Build ``cls`` from a mapping (a config file or parsed args); unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown setting(s) for {cls.__name__}: {', '.join(sorted(unknown))}")
    hints = typing.get_type_hints(cls)
    clean = {}
    for key, value in values.items():
        _, _, seq = _base_type(hints[key])
        clean[key] = tuple(value) if seq and isinstance(value, list) else value
    if base is not None:
        return dataclasses.replace(base, **clean)
    return cls(**clean)


def from_args(cls: type[T], args: argparse.Namespace, config_file: str | None = None) -> T:
    """Defaults, then a JSON config file (if given), then the flags that were set."""
    base = None
    if config_file:
        with open(config_file, encoding="utf-8") as fh:
            base = from_mapping(cls, json.load(fh))
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return from_mapping(cls, given, base)
