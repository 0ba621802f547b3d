"""A minimal TOML writer for test configs (str, int, float, bool, lists, tables, [[arrays]])."""
from __future__ import annotations

import json
from typing import Any, Mapping


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if hasattr(value, "__fspath__"):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_scalar(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(v, Mapping) for v in value)


def dumps(data: Mapping[str, Any], _prefix: str = "") -> str:
    """Serialize nested mappings to TOML text."""
    lines: list[str] = []
    nested: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, Mapping) or _is_table_array(value):
            nested.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_scalar(value)}")
    for key, value in nested:
        name = f"{_prefix}{_key(key)}"
        if isinstance(value, Mapping):
            lines += ["", f"[{name}]", dumps(value, name + ".").rstrip("\n")]
        else:
            for item in value:
                lines += ["", f"[[{name}]]", dumps(item, name + ".").rstrip("\n")]
    return "\n".join(line for line in lines if line is not None).strip("\n") + "\n"


def deep_merge(base: dict, override: Mapping) -> dict:
    """Return *base* updated recursively with *override* (tables merge, others replace)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out
