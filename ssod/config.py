"""Configuration: one defaults file, then a user config file, then CLI flags (in that order).

Method hyperparameters live in ``configs/methods/<method>.yaml`` and land under ``method_cfg``;
a user config may override single keys of it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(str(resources.files("ssod") / "configs"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of keys to values")
    return data


def deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in new.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(items: list[str] | None, option: str = "--set") -> dict[str, Any]:
    """``["lambda_u=1.0", "adaptive_thresholds=false"]`` -> a dict, each value read as YAML (numbers,
    booleans, lists), as ultralytics reads ``key=value`` arguments. Keys are checked by the method.
    ``option`` names the flag in errors."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            example = ", e.g. --set lambda_u=1.0" if option == "--set" else ""
            raise ValueError(f"{option} {item!r}: expected KEY=VALUE{example}")
        try:
            out[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ValueError(f"{option} {item!r}: value is not valid YAML") from None
    return out


def method_defaults(method: str) -> dict[str, Any]:
    path = CONFIG_DIR / "methods" / f"{method}.yaml"
    return _read_yaml(path) if path.exists() else {}


def resolve_config(config_file: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """defaults < config file < overrides (None values in overrides mean 'not given')."""
    cfg = _read_yaml(CONFIG_DIR / "default.yaml")
    user = _read_yaml(Path(config_file)) if config_file else {}
    unknown = set(user) - set(cfg)
    if unknown:
        raise ValueError(f"{config_file}: unknown keys {sorted(unknown)}")
    cfg = deep_update(cfg, {k: v for k, v in user.items() if k != "method_cfg"})
    cfg = deep_update(cfg, {k: v for k, v in overrides.items() if v is not None})
    cfg["method_cfg"] = deep_update(method_defaults(cfg["method"]), user.get("method_cfg") or {})
    if overrides.get("method_cfg"):
        cfg["method_cfg"] = deep_update(cfg["method_cfg"], overrides["method_cfg"])
    return cfg
