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
    opts.log_severity_level = 3
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


def export_onnx(module, sample: np.ndarray, path: Path, opset: int) -> None:
    """Export module to ONNX with a dynamic batch axis, then run the checker and shape inference."""
    import torch

    module = module.eval().cpu()
    x = torch.from_numpy(np.ascontiguousarray(sample[:2]))
    with atomic_path(path) as tmp:
        try:
            with warnings.catch_warnings(), _stdout_to_log():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module, (x,), str(tmp), input_names=["input"], output_names=["logits"],
                    opset_version=opset, dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                    dynamo=False,
                )
        except OSError:
            raise  # a full disk or an unwritable folder: atomic_path says so
        except Exception as exc:
            from .op_support import export_failure

            raise export_failure(exc, module, sample, opset) from exc
        check_graph(tmp, "exported", rewrite=True)


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


def run_session(session, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Max absolute difference and argmax agreement between two logit arrays."""
    return {
        "max_abs_diff": float(np.max(np.abs(reference - candidate))) if reference.size else 0.0,
        "agreement": float(np.mean(reference.argmax(1) == candidate.argmax(1))) if len(reference) else 1.0,
        "rows": int(len(reference)),
    }
