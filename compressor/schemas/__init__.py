"""The JSON Schemas shipped with the package (report.json, target profiles) and one way to check against them."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from ..errors import CompressError

DIR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def load(name: str) -> dict:
    """The schema `<name>.schema.json`."""
    return json.loads((DIR / f"{name}.schema.json").read_text())


def validate(instance, name: str, what: str):
    """Return instance, or raise CompressError naming the first place where it breaks schema `name`."""
    import jsonschema

    errors = sorted(jsonschema.Draft202012Validator(load(name)).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        at = "/".join(map(str, e.absolute_path)) or "(top level)"
        raise CompressError(f"{what} is invalid at {at}: {e.message[:200]}")
    return instance
