"""YAML recipes: defaults for CLI options. Precedence: explicit flag > recipe > built-in default."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ConfigError


def load_recipe(path: str | None, allowed: set[str]) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {path!r} does not exist")
    import yaml

    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path!r} must be a mapping of option: value")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"recipe {path!r} has unknown keys {unknown}; allowed: {sorted(allowed)}")
    return data


def pick(flag: Any, recipe: dict[str, Any], key: str, default: Any) -> Any:
    if flag is not None:
        return flag
    return recipe.get(key, default)
