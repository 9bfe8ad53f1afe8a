"""Teachers: TorchScript, torch.export programs, ONNX (black box), state dicts with an architecture,
and (only with --trust) whole pickled modules. The format is read from the content, not the extension."""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CompressError
from ._spec import call_factory, load_callable

_ONNX_INT = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
TRUST_HINT = "a pickled module runs arbitrary code when loaded; pass --trust only if you trust its source, or save it with torch.jit.save / torch.export instead"


@dataclass
class Teacher:
    """A loaded teacher: a torch module (white box) or an ONNX Runtime session (black box)."""

    path: Path
    format: str  # torchscript | torch.export | onnx | state_dict | pickle
    module: object | None = None  # torch.nn.Module-like callable
    session: object | None = None  # onnxruntime.InferenceSession for ONNX teachers
    input_shape: tuple | None = None  # declared input shape when the format records one
    device: str = "cpu"  # where a white-box teacher runs (see to())
    output: str = "logits"  # what its scores are: logits, or probs (logits() then returns their log); outputs.resolve_teacher_output
    output_record: dict | None = None  # how that was decided (detected or asked), for the run's result and report

    def to(self, device: str) -> "Teacher":
        """Run a white-box teacher on `device` (e.g. 'cuda' for the pool logits); ONNX teachers stay on ONNX Runtime."""
        if self.module is not None and device != self.device and hasattr(self.module, "to"):
            self.module = self.module.to(device)
            self.device = device
        return self

    @property
    def white_box(self) -> bool:
        return self.module is not None

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the teacher was exported with, when it only accepts that one."""
        b = self.input_shape[0] if self.input_shape else None
        return b if isinstance(b, int) and b > 0 else None

    @property
    def runtime(self) -> str:
        return "onnxruntime" if self.session is not None else "torch"

    def logits(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Teacher outputs (N, classes) as float32 for the rows of x."""
        fixed = self.fixed_batch
        if fixed:  # exported with a static batch size: run in chunks of exactly that size, padding the last
            batch_size = fixed
        outs = []
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            if fixed and len(xb) < fixed:
                pad = np.repeat(xb[-1:], fixed - len(xb), axis=0)
                outs.append(self._run(np.concatenate([xb, pad]))[: len(xb)])
            else:
                outs.append(self._run(xb))
        out = np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
        if out.ndim != 2:
            raise CompressError(f"teacher {self.path.name} returns shape {out.shape[1:]} per row; expected a vector of class scores")
        return self.as_logits(out)

    def as_logits(self, out: np.ndarray) -> np.ndarray:
        """(N, C) scores as logits: probabilities (self.output == "probs") become their log."""
        if self.output != "probs":
            return out
        from .outputs import log_probs

        return log_probs(out)

    def _run(self, xb: np.ndarray) -> np.ndarray:
        try:
            if self.session is not None:
                inp = self.session.get_inputs()[0]
                if xb.dtype.kind in "iu" and inp.type in _ONNX_INT:  # token ids in the integer type the model declares
                    xb = xb.astype(_ONNX_INT[inp.type])
                return _check_rows(np.asarray(self.session.run(None, {inp.name: xb})[0], np.float32), len(xb), self.path.name)
            import torch

            with torch.inference_mode(), torch.autocast("cuda", enabled=self.device == "cuda"):
                y = self.module(torch.from_numpy(np.ascontiguousarray(xb)).to(self.device))
            if isinstance(y, (tuple, list)) and y:
                y = y[0]
            if not isinstance(y, torch.Tensor):
                raise CompressError(f"teacher {self.path.name} returns {_describe(y)}, not a tensor of class scores",
                                    hint="the teacher must return a (batch, classes) tensor (or a tuple whose first entry is one)")
            return _check_rows(y.float().cpu().numpy(), len(xb), self.path.name)
        except CompressError:
            raise
        except Exception as exc:
            if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
                raise CompressError(f"out of GPU memory running the teacher on batches of {len(xb)} rows",
                                    hint="lower --batch-size (the teacher runs in batches of 4x it) or use --device cpu",
                                    kind="runtime") from None
            lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
            # TorchScript wraps the real error: its first line is boilerplate, the cause is on the last one
            msg = (lines[-1] if lines[0].startswith("The following operation failed") else lines[0])[:300] if lines else type(exc).__name__
            hint = "check that --data matches the teacher's expected input (shape, channels, size)"
            if xb.dtype.kind in "iu":
                hint = ("the data's x holds integers, which are read as token ids for a model that starts with an embedding; "
                        "if they are feature values (e.g. uint8 pixels), convert x to float32 in the scale the teacher expects")
            raise CompressError(f"the teacher cannot run on data of shape {tuple(xb.shape[1:])}: {msg}", hint=hint) from exc

    def num_params(self) -> int | None:
        if self.module is not None and hasattr(self.module, "parameters"):
            return int(sum(p.numel() for p in self.module.parameters()))
        if self.session is not None:
            import onnx

            m = onnx.load(str(self.path), load_external_data=False)
            return int(sum(int(np.prod(t.dims)) for t in m.graph.initializer))
        return None


def _describe(y) -> str:
    from .outputs import describe_output

    return describe_output(y)


def _check_rows(out: np.ndarray, n: int, name: str) -> np.ndarray:
    """A batch's output must have one row per input row: a scalar or a batch-less output is a CompressError."""
    if out.ndim == 0 or out.shape[0] != n:
        what = "a scalar (a 0-d tensor)" if out.ndim == 0 else f"shape {out.shape}"
        raise CompressError(f"teacher {name} returns {what} for a batch of {n} rows; expected (batch, classes) class scores",
                            hint="the teacher must return one row of class scores per input row (no reduction such as .sum() or .mean() at the end)")
    return out


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
    from ._blackbox_teacher import is_query_spec, load_query_teacher

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
