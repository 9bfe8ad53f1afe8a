"""Teachers: TorchScript, torch.export programs, ONNX (black box), state dicts with an architecture,
and (only with --trust) whole pickled modules. The format is read from the content, not the extension."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

from ..errors import CompressError
from ._spec import call_factory, load_callable
from .teacher_base import Teacher

TRUST_HINT = "a pickled module runs arbitrary code when loaded; pass --trust only if you trust its source, or save it with torch.jit.save / torch.export instead"


def sniff_format(path: Path) -> str:
    """Guess the format from the bytes: 'torchscript', 'torch.export', 'torch.save', 'onnx' or 'unknown'."""
    try:
        is_zip = zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, ValueError):  # is_zipfile itself raises on some damaged end records
        return "unknown"
    if is_zip:
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError):
            return "unknown"  # damaged: undecodable member names (UnicodeDecodeError), unknown zip versions, ...
        if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
            return "torch.export"
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch.save"
        return "unknown"
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:1] == b"\x80":  # legacy (non-zip) torch.save pickle
        return "torch.save"
    return "onnx"  # protobuf has no magic number; the ONNX parser decides


def load_teacher(path: str | Path, arch: str | None = None, trust: bool = False, cwd: str | None = None, *, files_only: bool = False) -> Teacher:
    """Load a teacher file, detecting its format from its content; or a black-box teacher you can only query:
    'file.py:fn' / 'package.module:fn' (a Python callable) or 'cmd:CMD ARGS' (a command run in cwd).
    files_only: `path` is a file name and nothing else, whatever it looks like (what a run folder names is data)."""
    from .query_teacher import is_query_spec, load_query_teacher

    if not files_only and is_query_spec(str(path)):
        return load_query_teacher(str(path), cwd)
    p = Path(path)
    if not p.exists():
        raise CompressError(f"teacher {p} does not exist")
    if p.is_dir():
        raise CompressError(f"teacher {p} is a folder; pass a model file (TorchScript, .pt2, ONNX or a state dict)")
    if not p.is_file():  # a FIFO would block the loader forever, /dev/zero would be read until the memory runs out
        raise CompressError(f"teacher {p} is not a regular file (a FIFO, a device or a socket)", hint="pass a model file")
    if p.stat().st_size == 0:
        raise CompressError(f"teacher {p} is empty")
    kind = sniff_format(p)
    if kind == "torchscript":
        return _load_torchscript(p)
    if kind == "torch.export":
        return _load_exported(p)
    if kind == "torch.save":
        return _load_pickle(p, arch, trust)
    if kind == "onnx":
        return _load_onnx(p)
    raise CompressError(f"teacher {p} is not a model file this tool reads", hint="use TorchScript, torch.export (.pt2), ONNX, or a state dict with --teacher-arch")


def _load_torchscript(p: Path) -> Teacher:
    import torch

    try:
        m = torch.jit.load(str(p), map_location="cpu")
    except Exception as exc:
        raise CompressError(f"teacher {p} looks like TorchScript but cannot be loaded: {str(exc).splitlines()[0][:200]}", hint="the file may be truncated") from None
    m.eval()
    return Teacher(p, "torchscript", module=m)


def _load_exported(p: Path) -> Teacher:
    import torch

    try:
        ep = torch.export.load(str(p))
    except Exception as exc:
        raise CompressError(f"teacher {p} looks like a torch.export program but cannot be loaded: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
    shape = None
    try:
        spec = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"][0]
        node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == spec.arg.name)
        shape = tuple(int(d) if str(d).isdigit() else None for d in node.meta["val"].shape)
    except Exception:
        pass
    return Teacher(p, "torch.export", module=ep.module(), input_shape=shape)


def _load_pickle(p: Path, arch: str | None, trust: bool) -> Teacher:
    import torch

    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CompressError(f"teacher {p} is a corrupt torch file: {str(exc).splitlines()[0][:200]}") from None
        if not trust:
            raise CompressError(f"teacher {p} is a whole pickled module, which is refused without --trust", hint=TRUST_HINT) from None
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=False)  # trusted: only with --trust
        except Exception as exc2:
            raise CompressError(f"teacher {p} could not be unpickled even with --trust: {type(exc2).__name__}: {exc2}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CompressError(f"teacher {p} is a corrupt or truncated torch file: {msg}") from None
    if isinstance(obj, torch.nn.Module):
        obj.eval()
        return Teacher(p, "pickle", module=obj)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        if arch is None:
            raise CompressError(f"teacher {p} is a state dict (weights only)", hint="pass --teacher-arch file.py:factory that builds the matching module")
        fn = load_callable(arch, "--teacher-arch")
        module = call_factory(fn, arch, "--teacher-arch")
        if not isinstance(module, torch.nn.Module):
            raise CompressError(f"--teacher-arch '{arch}' returned {type(module).__name__}, not a torch.nn.Module")
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise CompressError(f"teacher state dict does not fit --teacher-arch '{arch}': {first[:300]}") from None
        module.eval()
        return Teacher(p, "state_dict", module=module)
    raise CompressError(f"teacher {p} holds a {type(obj).__name__}, not a model or a state dict")


def _load_onnx(p: Path) -> Teacher:
    import onnx

    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:
        raise CompressError(f"teacher {p} is not a model file this tool reads", hint="use TorchScript, torch.export (.pt2), ONNX, or a state dict with --teacher-arch") from None
    if not model.graph.node or not model.graph.input or not model.graph.output:
        raise CompressError(f"teacher {p} is not a model file this tool reads (no ONNX graph found)", hint="use TorchScript, torch.export (.pt2), ONNX, or a state dict with --teacher-arch")
    from ..export.onnx_io import check_external_data, make_session

    check_external_data(model, p)
    session = make_session(p, threads=None)
    dims = session.get_inputs()[0].shape
    shape = tuple(d if isinstance(d, int) else None for d in dims)
    return Teacher(p, "onnx", session=session, input_shape=shape)
