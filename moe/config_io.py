"""Config files: YAML with ``extends:``, ``key.path=value`` overrides, one-line errors.

Generic over the pydantic root model (the experiment, a grow file), so the schema in
``moe/config.py`` holds no file handling. Every mistake becomes a ``ConfigError`` whose message
is one line naming the file or override and the key, with a did-you-mean for unknown keys.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from moe.errors import UserError

M = TypeVar("M", bound=BaseModel)


class ConfigError(UserError):
    """A user error in a config file or override; the message is one line."""


def load(root: type[M], path: str | Path, overrides: Sequence[str] = ()) -> M:
    """Read ``path`` (following ``extends:``), apply ``key.path=value`` overrides (checked
    against ``root``'s fields), validate as ``root``."""
    path = Path(path)
    raw = _read_yaml(path, seen=())
    for item in overrides:
        _apply_override(raw, item, root)
    return validate(root, raw, where=str(path))


def validate(root: type[M], raw: dict[str, Any], where: str) -> M:
    """``root.model_validate(raw)``, with the first error as a one-line ConfigError."""
    try:
        return root.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain(err, raw, where, root)) from None


def dump(model: BaseModel) -> str:
    """A model as YAML, fields in declaration order."""
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    resolved = path.resolve()
    if resolved in seen:
        raise ConfigError(f"{path}: `extends` forms a cycle")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}{line}: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read ({err})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, not a list or value")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: `extends` must be a file path")
    parent = _read_yaml((path.parent / base), seen + (resolved,))
    return _deep_merge(parent, data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "mesh":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(raw: dict[str, Any], item: str, root: type[BaseModel]) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, item, where)]
            continue
        _check_known(root, parts[: depth + 1], item, rest=parts[depth + 1 :])
        node = node.setdefault(part, {})
        if not isinstance(node, dict | list):
            raise ConfigError(f"override {item!r}: {where} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, item, key)] = value
    else:
        if "family" not in node:  # a task family's keys are checked by its own model
            _check_known(root, parts, item)
        node[last] = value


def _list_index(node: list, part: str, item: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {item!r}: {where} needs an index below {len(node)}")
    return int(part)


def _fields_at(
    path: list[str], root: type[BaseModel], attr: str = "model_fields"
) -> dict[str, Any] | None:
    """The pydantic fields of the section at ``path`` (skipping list indices), or None; with
    ``attr``, that attribute of the section's model instead (``removed_keys``)."""
    model: Any = root
    for part in path:
        if part.isdigit():
            continue
        info = model.model_fields.get(part)
        if info is None:
            return None
        ann = info.annotation
        args = getattr(ann, "__args__", ())
        inner = next(
            (a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
        if inner is None:
            return {}
        model = inner
    return getattr(model, attr, {})


def _check_known(root, parts: list[str], item: str, rest: list[str] = ()) -> None:
    fields = _fields_at(parts[:-1], root)
    if not fields or parts[-1] in fields or parts[-1].isdigit():
        return
    if parts[-1] in (_fields_at(parts[:-1], root, "removed_keys") or ()):
        return  # the schema's validator says what replaced it
    raise ConfigError(f"override {item!r}: {_unknown(parts, list(fields), rest)}")


def _unknown(parts: list[str], choices: list[str], rest: list[str] = ()) -> str:
    """'unknown key X; did you mean Y' with Y the whole corrected path (`modle.d_model` ->
    `model.d_model`)."""
    key = ".".join([*parts, *rest])
    close = difflib.get_close_matches(parts[-1], choices, n=1, cutoff=0.5)
    hint = f"; did you mean {'.'.join([*parts[:-1], close[0], *rest])!r}" if close else ""
    return f"unknown key {key!r}{hint}"


def _explain(err: ValidationError, raw: dict[str, Any], where: str, root: type[BaseModel]) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    key = ".".join(loc)
    if first["type"] == "extra_forbidden":
        fields = _fields_at(loc[:-1], root) or {}
        section = raw.get(loc[0]) if len(loc) == 1 else None
        rest = [str(next(iter(section)))] if isinstance(section, dict) and section else []
        return f"{where}: {_unknown(loc, list(fields), rest)}"
    if first["type"] == "missing":
        return f"{where}: missing required key {key!r}"
    message = first["msg"].removeprefix("Value error, ")
    if not loc:
        return f"{where}: {message}"
    value = first.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict | list) else ""
    return f"{where}: {key}: {message}{shown}"
