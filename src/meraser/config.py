"""Typed configs that fail loudly: unknown keys, wrong types and bad values raise at load time.

Every config is a dataclass whose fields carry a default and a one-line `help` in their metadata. `from_dict`
refuses unknown keys with a suggestion; nested dataclasses are built recursively; `load_yaml` refuses duplicate
keys (PyYAML silently keeps the last one otherwise).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from meraser.utils import MeraserError, did_you_mean

T = TypeVar("T", bound="Config")


def field(default: Any = dataclasses.MISSING, help: str = "", **kw) -> Any:
    # mutable defaults (a list, a dict, a nested config) are copied for every instance
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        value = default
        return dataclasses.field(default_factory=lambda: dataclasses.replace(value), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def key_path(where: str, key: str) -> str:
    """`where` + `key` for error messages: 'exp.yaml: erase.overrides' after a file, dotted otherwise."""
    return f"{where}{key}" if where.endswith(": ") else f"{where}.{key}"


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except MeraserError as e:
                errors.append(str(e))
        raise MeraserError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            choices = [str(a) for a in typing.get_args(tp)]
            raise MeraserError(f"{where}: {value!r} is not one of {choices}{did_you_mean(str(value), choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise MeraserError(f"{where}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return [_check_type(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise MeraserError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise MeraserError(f"{where}: expected a mapping, got {value!r}")
        return tp.from_dict(value, where=where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads "1e-4" as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise MeraserError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return value


def _over_default(f: dataclasses.Field, value):
    """A partial mapping for a nested config whose default is a config instance (a method's own GCG settings) is
    laid over that default, so `--set search.steps=8` keeps the method's other search settings."""
    if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    return {**default.to_dict(), **value} if isinstance(default, Config) else value


@dataclasses.dataclass
class Config:
    """Base class: subclasses are dataclasses; `validate` hooks check values beyond types."""

    @classmethod
    def from_dict(cls: type[T], data: dict | None, where: str | None = None) -> T:
        where = where or cls.__name__
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = [k for k in data if k not in names]
        if unknown:
            k = unknown[0]
            if k in getattr(cls, "misplaced_keys", {}):
                raise MeraserError(f"{key_path(where, k)}: {cls.misplaced_keys[k]}")
            raise MeraserError(f"{where.rstrip(': ')}: unknown key '{k}'{did_you_mean(k, names)} "
                               f"(known: {', '.join(names)})")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {k: _check_type(_over_default(fields[k], v), hints[k], key_path(where, k)) for k, v in data.items()}
        obj = cls(**kwargs)
        obj.validate(where)
        return obj

    def validate(self, where: str) -> None:
        """Override to check values; raise MeraserError naming `where`."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self: T, **changes) -> T:
        merged = {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **changes}
        return type(self).from_dict(
            {k: (v.to_dict() if isinstance(v, Config) else v) for k, v in merged.items()}
        )

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}



def load_yaml(path: str | Path) -> dict:
    """Load a YAML mapping, refusing duplicate keys with the file and line."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise MeraserError(f"{path}:{key_node.start_mark.line + 1}: duplicate key '{key}'")
            seen[key] = True
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    from meraser.utils import read_text

    path = Path(path)
    try:
        data = yaml.load(read_text(path, "config file"), Loader=Loader)
    except yaml.YAMLError as e:
        raise MeraserError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise MeraserError(f"{path}: expected a mapping at the top level")
    return data
