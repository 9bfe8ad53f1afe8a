"""ONNX export from PyTorch, structural checks, ONNX Runtime sessions, and the numeric check."""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np

from .._io import atomic_path
from ..errors import CompressError


def make_session(path: str | Path, threads: int | None = 1, providers: list[str] | None = None, emulate_qdq: bool = False):
    """An ONNX Runtime session with a fixed thread count (None: ORT's default). emulate_qdq: run Q/DQ pairs as written
    (quantize, dequantize, float op) instead of fusing them into ONNX Runtime's integer CPU kernels, which on x86 CPUs
    without VNNI compute u8×s8 products with 16-bit saturation; the emulation is the arithmetic of TensorRT's INT8
    (exact int8 products, int32 sums), so a graph meant for TensorRT is judged as the device will run it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if emulate_qdq:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # its errors reach the caller as exceptions (and then as our one-line errors), not as log lines
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:
        raise CompressError(f"ONNX Runtime cannot load {path}: {str(exc).splitlines()[0][:300]}") from None


def check_external_data(model, model_path: Path) -> None:
    """Refuse external-data references that point outside the model's folder."""
    import onnx

    base = model_path.resolve().parent
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            target = (base / loc).resolve()
            if os.path.isabs(loc) or not target.is_relative_to(base):
                raise CompressError(f"ONNX model {model_path} references external data outside its folder: {loc!r}", hint="keep external data files beside the model")


@contextlib.contextmanager
def _stdout_to_log():
    """Send what the exporter's C++ side prints on stdout (the whole TorchScript graph when an op fails) to the
    run's log at debug level instead of the console, which shows one line per error."""
    import logging
    import sys
    import tempfile

    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace").strip()
            if text:
                logging.getLogger("compressor").debug("torch.onnx.export printed:\n%s", text)


# The exporters tried, in order (benchmarks/results/export_zoo.md, 24 students people write): the TorchScript-based
# exporter took a median 0.04 s and exported 22; the torch.export-based one (dynamo=True) took a median 2.2 s (up to
# 9 s for RNNs, plus about 4 s for its first export in a process) and exported 23, the non-dividing adaptive average
# pool among them. Both fail on a non-dividing adaptive max pool.
EXPORTERS = ("torchscript", "dynamo")
EXPORTER_LABELS = {"torchscript": "TorchScript-based exporter (dynamo=False)", "dynamo": "torch.export-based exporter (dynamo=True)"}
DYNAMO_MIN_OPSET = 18  # the torch.export-based exporter builds opset 18 and cannot convert graphs with ReduceMean down


def _export_torchscript(module, x, tmp: Path, opset: int, optimize: bool = True) -> int:
    import torch

    torch.onnx.export(module, (x,), str(tmp), input_names=["input"], output_names=["logits"], opset_version=opset,
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return opset


def _export_dynamo(module, x, tmp: Path, opset: int, optimize: bool = True) -> int:
    import logging

    import torch

    opset = max(opset, DYNAMO_MIN_OPSET)
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export", "torch._export", "torch.fx", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:  # its progress lines, opset warnings and the version converter's traceback: to nobody
        lg.setLevel(logging.ERROR)
    try:
        torch.onnx.export(module, (x,), str(tmp), input_names=["input"], output_names=["logits"], opset_version=opset, dynamo=True,
                          external_data=False, verbose=False, optimize=optimize, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 16)},))
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
    return opset


_EXPORT = {"torchscript": _export_torchscript, "dynamo": _export_dynamo}


def _short(reason: str) -> str:
    """A second exporter's reason without what the first one's message already says."""
    import re

    reason = re.sub(r"^the student cannot be exported to ONNX \(opset \d+\): ", "", reason)
    return re.sub(r"<class '[\w.]+\.(\w+)'>", r"\1", reason)


def _check_dynamic_batch(path: Path, batch: int) -> None:
    import onnx

    dim = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    if dim and not dim[0].dim_param:
        raise CompressError(f"the graph's batch size is fixed at {dim[0].dim_value} (the example had {batch} rows): the model turns the "
                            "batch size into a constant", hint="reshape with x.flatten(1) or x.view(x.size(0), -1), not a Python int", kind="runtime")


def export_onnx(module, sample: np.ndarray, path: Path, opset: int, *, verify=None, exporters=EXPORTERS, optimize: bool = True) -> dict:
    """Export module to ONNX with a dynamic batch axis, trying each exporter in turn and keeping the first graph that
    passes onnx.checker, strict shape inference, a dynamic batch and verify(path) (the caller's numeric check, which
    raises CompressError); a tuple or dict output is exported as its first entry. Returns {"exporter", "tool",
    "opset", "rejected": [{"exporter", "reason"}]}; when every exporter fails, the first one's error (naming the
    operation and the student module) says why, with the others' reasons after it. optimize=False skips the
    torch.export-based exporter's own graph optimiser (about 1-3 s; the preflight only needs to know the graph exists)."""
    import torch

    from ..models.outputs import select_output

    module = module.eval().cpu()
    xs = np.ascontiguousarray(sample[:2] if len(sample) >= 2 else np.repeat(sample[:1], 2, axis=0))  # >= 2 rows: a batch of 1 may be fixed
    x = torch.from_numpy(xs)
    with torch.no_grad():
        if not isinstance(module(x), torch.Tensor):
            module = select_output(module, None)
    rejected, errors = [], []
    for name in exporters:
        try:
            with atomic_path(path) as tmp:
                try:
                    with warnings.catch_warnings(), _stdout_to_log():
                        warnings.simplefilter("ignore")
                        used = _EXPORT[name](module, x, tmp, opset, optimize)
                except OSError:
                    raise  # a full disk or an unwritable folder: atomic_path says so
                except CompressError:
                    raise
                except Exception as exc:
                    from .op_support import export_failure

                    raise export_failure(exc, module, sample, opset) from exc
                check_graph(tmp, "exported", rewrite=True)
                _check_dynamic_batch(tmp, len(xs))
                if verify is not None:
                    try:
                        verify(tmp)
                    except CompressError:
                        raise
                    except Exception as exc:  # ONNX Runtime failing at a batch size other than the export's
                        msg = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
                        raise CompressError(f"ONNX Runtime cannot run the exported graph on a batch other than the example's {len(xs)} rows: {msg}",
                                            hint="the model turns the batch size into a constant: reshape with x.flatten(1) or "
                                                 "x.view(x.size(0), -1), not a Python int", kind="runtime") from None
            return {"exporter": name, "tool": f"torch.onnx.export ({EXPORTER_LABELS[name]}, torch {torch.__version__})", "opset": used,
                    "rejected": rejected}
        except CompressError as exc:
            errors.append(exc)
            rejected.append({"exporter": name, "reason": exc.message})
    first = errors[0]
    others = "; ".join(f"the {EXPORTER_LABELS[r['exporter']]} also failed: {_short(r['reason'])}" for r in rejected[1:])
    raise CompressError(f"{first.message} [{EXPORTER_LABELS[rejected[0]['exporter']]}]" + (f"; {others}" if others else ""),
                        hint=first.hint, kind=first.kind)


def check_graph(path: Path, what: str = "exported", *, rewrite: bool = False) -> None:
    """onnx.checker (full check) and strict shape inference; rewrite=True saves the graph with the inferred shapes."""
    import onnx

    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CompressError(f"the {what} ONNX graph fails onnx.checker or strict shape inference: {first}",
                            hint="rerun with --no-simplify" if what != "exported" else "try another --opset", kind="runtime") from exc
    if rewrite:
        onnx.save(model, str(path))


def input_dtype(session):
    """The numpy dtype a session's first input takes when it is not float32 (an FP16 model with float16 I/O), else None."""
    return np.float16 if session.get_inputs()[0].type == "tensor(float16)" else None


def run_session(session, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The session's first output over x in batches, as float32 (a float16-I/O model's input cast on the way in)."""
    name, dtype = session.get_inputs()[0].name, input_dtype(session)
    if dtype is not None and x.dtype.kind == "f":
        x = x.astype(dtype)
    out = np.concatenate([session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])
    return out.astype(np.float32) if out.dtype == np.float16 else out


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Max absolute difference and argmax agreement between two logit arrays."""
    return {
        "max_abs_diff": float(np.max(np.abs(reference - candidate))) if reference.size else 0.0,
        "agreement": float(np.mean(reference.argmax(1) == candidate.argmax(1))) if len(reference) else 1.0,
        "rows": int(len(reference)),
    }
