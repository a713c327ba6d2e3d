"""Typed job configs: a YAML file plus `a.b=c` overrides, loaded into dataclasses.

Every config in the project (build, model, stage, pipeline) is a dataclass tree. This module is
the one place that turns YAML into such a tree, so every command reports a bad config the same
way: one line naming the key, the value and the file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from pippo_common.errors import ConfigError

T = TypeVar("T")


MAX_CONFIG_BYTES = 1 << 20      # a config is a few KB; a larger file is a mistake or an attack
MAX_CONFIG_DEPTH = 64           # nesting of mappings/lists
MAX_CONFIG_VALUES = 100_000     # values of the tree with every YAML alias expanded


def _load_yaml(text: str):
    """yaml.safe_load, then `_check_tree`. RecursionError (thousands of nested brackets) becomes
    the nesting ConfigError."""
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"nested deeper than {MAX_CONFIG_DEPTH} levels") from None
    _check_tree(data)
    return data


def _check_tree(tree: Any) -> None:
    """Refuse trees that every later walk would blow up: YAML aliases share one object in the
    parsed tree, but overrides, ${VAR} expansion and typing copy it, so nine levels of nine
    aliases (a 1 KB "billion laughs" config) become 9^9 values; a recursive alias (`&a [*a]`)
    never ends. Aliases themselves are fine (PyYAML's dumper writes them for shared objects).
    Sizes are counted with every alias expanded, but each shared object is visited once."""
    sizes: dict[int, int] = {}
    open_ids: set[int] = set()          # containers on the current path: a cycle if met again
    stack: list[tuple[Any, int, bool]] = [(tree, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        children = list(node.values()) if isinstance(node, dict) else node
        if done:
            open_ids.discard(id(node))
            sizes[id(node)] = 1 + len(node) + sum(sizes[id(c)] for c in children if isinstance(c, (dict, list)))
            if sizes[id(node)] > MAX_CONFIG_VALUES:
                raise ConfigError(f"expands to more than {MAX_CONFIG_VALUES} values (YAML aliases?)")
            continue
        if not isinstance(node, (dict, list)) or id(node) in sizes:
            continue
        if id(node) in open_ids:
            raise ConfigError("a YAML alias refers to itself (a recursive structure)")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"nested deeper than {MAX_CONFIG_DEPTH} levels")
        open_ids.add(id(node))
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children if isinstance(c, (dict, list)))


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    """`["a.b=3", "c=[1, 2]"]` -> {"a": {"b": 3}, "c": [1, 2]} (values parsed as YAML scalars)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = _load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        except ConfigError as exc:
            raise ConfigError(f"override {key!r}: {exc}") from None
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a sub-key of a scalar")
        node[leaf] = value
    return tree


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; `update` wins, nested dicts merge key by key."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_config_bytes(path: str | Path, what: str = "config") -> bytes:
    """The bytes of a config-sized file (a YAML or JSON config, a DeepSpeed config, a checkpoint's
    model.json or run.json): a local path or file:// that is a regular file, or an object-store
    URL, of at most MAX_CONFIG_BYTES; anything else is one ConfigError line. Local files are
    stat'ed first and opened non-blocking: opening a FIFO blocks, reading /dev/zero never ends."""
    from pippo_common.storage import NotRegularFile, fs_and_path, is_local, open_regular

    shown = str(path)
    if "::" in shown:
        raise ConfigError(f"cannot read {what} {shown}: chained URLs (::) are not allowed")
    try:
        fs, fpath = fs_and_path(shown) if "://" in shown else (None, shown)
        if fs is None or is_local(fs):
            with open_regular(fpath) as f:
                blob = None if os.fstat(f.fileno()).st_size > MAX_CONFIG_BYTES else f.read(MAX_CONFIG_BYTES + 1)
        else:
            with fs.open(fpath, "rb") as f:
                size = getattr(f, "size", None)
                blob = None if isinstance(size, int) and size > MAX_CONFIG_BYTES else f.read(MAX_CONFIG_BYTES + 1)
    except NotRegularFile:
        raise ConfigError(f"cannot read {what} {shown}: not a regular file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {shown}: {exc.strerror or type(exc).__name__}") from None
    except ValueError as exc:                 # a NUL in the path; an unknown protocol (StorageError)
        raise ConfigError(f"cannot read {what} {shown}: {exc}") from None
    if blob is None or len(blob) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{shown}: larger than {MAX_CONFIG_BYTES} bytes; not a {what}")
    return blob


def _text(blob: bytes, shown: str) -> str:
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{shown}: not UTF-8 text (byte {exc.start})") from None


def read_json_config(path: str | Path, what: str = "config") -> Any:
    """A JSON file under the rules of `read_config_bytes`, parsed (one ConfigError line if not)."""
    text = _text(read_config_bytes(path, what), str(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    try:
        _check_tree(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return data


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a dict: a regular file of at most MAX_CONFIG_BYTES, UTF-8, no
    more than MAX_CONFIG_VALUES values with aliases expanded, nested at most MAX_CONFIG_DEPTH
    levels (anything else is one ConfigError line)."""
    text = _text(read_config_bytes(path), str(path))
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


ENV_DEFAULTS = {"PIPPO_STORE": "./.pippo/store"}
_ENV_REF = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_env(value: Any, source: str = "<config>") -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string (PIPPO_STORE defaults to ./.pippo/store).

    The value of a secret-named variable (pippo_common.redact.is_secret_env_name: `${HF_TOKEN}`,
    `${AWS_SECRET_ACCESS_KEY}`, not `${AWS_ACCESS_KEY_ID}`), and URL credentials in the result, are
    registered with the one redactor: logs, outputs and records show `${NAME}` instead. Other
    values (buckets, ids, paths) are data and are kept as they are."""
    if isinstance(value, dict):
        return {k: expand_env(v, source) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, source) for v in value]
    if not isinstance(value, str):
        return value

    from pippo_common.redact import is_secret_env_name, register_secret, register_url_credentials

    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        got = os.environ.get(name) or default or ENV_DEFAULTS.get(name)
        if got is None:
            raise ConfigError(f"{source}: ${{{name}}} is not set and has no default")
        if os.environ.get(name) and is_secret_env_name(name):
            register_secret(got, f"${{{name}}}")
        return got
    out = _ENV_REF.sub(sub, value)
    if "@" in out:
        register_url_credentials(out)
    return out


# Paths to other config files written inside a config (a stage's `model:` and `deepspeed:`, a
# pipeline step's `config:`) resolve against the directory of the file they are written in, so a
# config works from any working directory and `pippo submit` can ship it. Fields opt in with
# `metadata=FILE_PATH`; a dict field names its path keys with `metadata={FILE_PATH_KEYS: (...)}`.
# Paths given on the command line (overrides), defaults and data locations (dataset URIs, sources,
# checkpoint roots, ${PIPPO_STORE}) stay relative to the working directory, like any CLI path.
FILE_PATH = {"pippo.file_path": True}
FILE_PATH_KEYS = "pippo.file_path_keys"


def resolve_file_path(value: Any, base_dir: Path) -> Any:
    """`value` (as written in a config file in `base_dir`) as a path that works from any cwd.
    URLs, absolute paths and ${VAR}s are left as they are. Back-compat: configs written before
    this rule name repo-root paths (`configs/models/test.yaml`) and are run from the repo root;
    when only that cwd-relative file exists it is used, with a warning."""
    if not isinstance(value, str) or not value or "://" in value or "${" in value or os.path.isabs(value):
        return value
    beside = os.path.normpath(base_dir / value)
    if not os.path.exists(beside) and os.path.exists(value):
        import logging

        logging.getLogger("pippo.config").warning(
            "%s: found only relative to the working directory; paths in a config are relative to "
            "the config's own directory (%s), so write %s", value, base_dir,
            os.path.relpath(os.path.abspath(value), base_dir))
        return value
    return beside


def resolve_file_paths(cls: Any, raw: Any, base_dir: Path) -> Any:
    """`raw` (a config file's mapping for dataclass `cls`) with its FILE_PATH fields resolved by
    `resolve_file_path`, through nested dataclasses, dicts and lists of them."""
    if not dataclasses.is_dataclass(cls) or not isinstance(raw, dict):
        return raw
    hints = typing.get_type_hints(cls)
    out = dict(raw)
    for f in dataclasses.fields(cls):
        if f.name not in out:
            continue
        value, tp = out[f.name], hints[f.name]
        if f.metadata.get("pippo.file_path"):
            out[f.name] = resolve_file_path(value, base_dir)
        elif f.metadata.get(FILE_PATH_KEYS) and isinstance(value, dict):
            out[f.name] = {k: resolve_file_path(v, base_dir) if k in f.metadata[FILE_PATH_KEYS] else v
                           for k, v in value.items()}
        elif typing.get_origin(tp) is dict and isinstance(value, dict):
            item = (typing.get_args(tp) or (Any, Any))[1]
            out[f.name] = {k: resolve_file_paths(item, v, base_dir) for k, v in value.items()}
        elif typing.get_origin(tp) in (list, tuple) and isinstance(value, list) and typing.get_args(tp):
            out[f.name] = [resolve_file_paths(typing.get_args(tp)[0], v, base_dir) for v in value]
        else:
            out[f.name] = resolve_file_paths(tp, value, base_dir)
    return out


def load_config(cls: type[T], path: str | Path | None, overrides=(), *, data: dict | None = None) -> T:
    """Load `path` (YAML) with `overrides` applied into dataclass `cls`, checking every key. The
    file's own FILE_PATH fields resolve against its directory (local files; a config read from a
    URL keeps them as written); `data` and `overrides` are taken as they are."""
    source = str(path) if path is not None else "<defaults>"
    raw = read_yaml(path) if path is not None else {}
    if path is not None and "://" not in str(path):
        raw = resolve_file_paths(cls, raw, Path(path).absolute().parent)
    if data:
        raw = merge(raw, data)
    raw = merge(raw, parse_overrides(list(overrides)))
    return from_dict(cls, expand_env(raw, source), source=source)


def from_dict(cls: type[T], raw: Any, *, source: str = "<dict>", prefix: str = "") -> T:
    return _convert(cls, raw, source, prefix)


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain YAML/JSON-able dict."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become their JSON-ish repr (MLflow params)."""
    out: dict[str, Any] = {}
    if dataclasses.is_dataclass(tree):
        tree = to_dict(tree)
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    out[prefix[:-1]] = tree
    return out


def _bad(source: str, key: str, value: Any, want: str) -> ConfigError:
    return ConfigError(f"{source}: bad value for '{key}': {value!r} (expected {want})")


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, source, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else _bad(source, key, value, _type_name(tp))
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise _bad(source, key, value, "one of " + ", ".join(map(str, choices)))
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _bad(source, key, value, f"a mapping for {tp.__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(map(str, set(value) - set(fields)))
        if unknown:
            name = f"{key}.{unknown[0]}" if key else unknown[0]
            raise ConfigError(
                f"{source}: unknown key '{name}' (known: {', '.join(sorted(fields))})")
        kwargs = {}
        for name, field in fields.items():
            sub = f"{key}.{name}" if key else name
            if name in value:
                kwargs[name] = _convert(hints[name], value[name], source, sub)
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: missing required key '{sub}'")
        try:
            return tp(**kwargs)
        except (ValueError, TypeError) as exc:  # __post_init__ validation
            raise ConfigError(f"{source}: {key + ': ' if key else ''}{exc}") from None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _bad(source, key, value, _type_name(tp))
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise _bad(source, key, value, f"{len(args)} items")
            return tuple(_convert(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(source, key, value, "a mapping")
        _, vt = typing.get_args(tp) or (Any, Any)
        return {k: _convert(vt, v, source, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(source, key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(source, key, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(source, key, value, "a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _bad(source, key, value, "a string")
        return value
    raise ConfigError(f"{source}: '{key}' has unsupported type {tp!r}")  # a programming error


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return "a list"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))
