"""Device profiles: one TOML file per device in targets/, validated against a JSON Schema."""
from __future__ import annotations

import functools
import tomllib
from pathlib import Path

from . import schemas
from .errors import CompressError, did_you_mean

_PKG = Path(__file__).parent


def _profiles_dir() -> Path:
    # In a wheel the profiles are packaged as compressor/_targets; in a source checkout they sit in targets/.
    packaged = _PKG / "_targets"
    return packaged if packaged.is_dir() else _PKG.parent / "targets"


def load_profile(path: str | Path) -> dict:
    """Read and validate one profile file."""
    path = Path(path)
    try:
        profile = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompressError(f"target profile {path} does not exist") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CompressError(f"target profile {path} is not valid TOML: {exc}") from None
    except OSError as exc:  # a folder, no permission, ...
        raise CompressError(f"target profile {path} cannot be read: {exc.strerror or exc}") from None
    schemas.validate(profile, "target", f"target profile {path}")
    from .export.quantize import list_recipes

    recipe = profile["quantization"]["int8_recipe"]
    if recipe not in list_recipes():
        raise CompressError(f"target profile {path}: unknown int8_recipe '{recipe}'.{did_you_mean(recipe, list_recipes())}",
                            hint=f"choose one of {', '.join(list_recipes())}")
    return profile


@functools.lru_cache(maxsize=1)
def _builtin() -> dict[str, dict]:
    return {p.stem: load_profile(p) for p in sorted(_profiles_dir().glob("*.toml"))}


def list_targets() -> list[dict]:
    """Every built-in profile, sorted by name."""
    return sorted(_builtin().values(), key=lambda p: p["name"])


def get_target(name: str) -> dict:
    """A profile by name, alias, or path to a user's own .toml file."""
    if name.endswith(".toml") or "/" in name:
        return load_profile(name)
    names = {}
    for p in _builtin().values():
        names[p["name"]] = p
        for alias in p.get("aliases", []):
            names[alias] = p
    if name in names:
        return names[name]
    raise CompressError(
        f"unknown target '{name}'.{did_you_mean(name, names)}",
        hint="run 'compress targets' to list them, or pass a path to your own .toml profile",
    )
