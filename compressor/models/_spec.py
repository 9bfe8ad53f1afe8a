"""Resolve 'path/to/file.py:factory' or 'package.module:factory' to a callable."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from ..errors import CompressError


def load_callable(spec: str, what: str):
    """The callable named by spec; CompressError if the file, module or attribute is missing."""
    if ":" not in spec:
        raise CompressError(f"{what} '{spec}' must look like file.py:factory or package.module:factory")
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise CompressError(f"{what} file {path} does not exist")
        name = f"_compressor_user_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            try:
                loader_spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[name]
                raise CompressError(f"{what} file {path} failed to import: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise CompressError(f"{what} module '{target}' cannot be imported: {exc}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise CompressError(f"{what} '{spec}': '{attr}' is not a callable in {target}")
    return fn


def call_factory(fn, spec: str, what: str, **available):
    """Call fn with the keyword arguments it declares among `available`; wrap its failures."""
    try:
        params = inspect.signature(fn).parameters
        takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in available.items() if takes_all or k in params}
    except (TypeError, ValueError):
        kwargs = {}
    try:
        return fn(**kwargs)
    except Exception as exc:
        raise CompressError(f"{what} '{spec}' raised {type(exc).__name__}: {exc}") from exc
