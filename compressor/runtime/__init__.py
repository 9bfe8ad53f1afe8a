"""Runners with one interface: activate, infer a batch, describe, deactivate (Polygraphy's split).
Each registers itself by name (compressor/runtime/registry.py: get_runner, list_runners); TensorRT's lazily."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .registry import get_runner, list_runners, register_runner  # noqa: F401  (re-exported)


class Runner:
    """Base runner: subclasses set name/format/runtime and implement activate() and infer()."""

    format = "pytorch"
    runtime = "torch"
    device = "cpu"

    def __init__(self, threads: int = 1):
        self.threads = threads

    def activate(self) -> "Runner":
        return self

    def infer(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def deactivate(self) -> None:
        pass

    def describe(self) -> dict:
        return {"format": self.format, "runtime": self.runtime, "device": self.device, "threads": self.threads}

    def __enter__(self):
        return self.activate()

    def __exit__(self, *exc):
        self.deactivate()


@register_runner("torch")
class TorchRunner(Runner):
    """A torch module (eager, TorchScript or an exported program's module) on the CPU."""

    def __init__(self, module, threads: int = 1):
        super().__init__(threads)
        self.module = module

    def activate(self):
        import torch

        self._saved_threads = torch.get_num_threads()  # restored in deactivate(): no lasting side effect on the caller
        torch.set_num_threads(self.threads)
        self.module.eval()
        self._torch = torch
        return self

    def deactivate(self):
        self._torch.set_num_threads(self._saved_threads)

    def infer(self, x):
        with self._torch.inference_mode():
            y = self.module(self._torch.from_numpy(x))
        if isinstance(y, (tuple, list)):
            y = y[0]
        return y.numpy()


@register_runner("onnxruntime")
class OnnxRuntimeRunner(Runner):
    """An ONNX model through ONNX Runtime's CPU execution provider, with a fixed thread count."""

    format = "onnx"
    runtime = "onnxruntime"

    def __init__(self, path: str | Path, threads: int = 1, providers: list[str] | None = None, emulate_qdq: bool = False):
        super().__init__(threads)
        self.path, self.providers, self.emulate_qdq = Path(path), providers or ["CPUExecutionProvider"], emulate_qdq

    def activate(self):
        from ..export.onnx_io import make_session

        self.session = make_session(self.path, self.threads, self.providers, emulate_qdq=self.emulate_qdq)
        self.input_name = self.session.get_inputs()[0].name
        from ..export.onnx_io import input_dtype

        self.input_dtype = input_dtype(self.session)  # float16 for an FP16 model with float16 I/O (--fp16-io)
        return self

    def infer(self, x):
        if self.input_dtype is not None and x.dtype != self.input_dtype and x.dtype.kind == "f":
            x = x.astype(self.input_dtype)  # the application hands it float16; here the cast is timed with the call
        y = self.session.run(None, {self.input_name: x})[0]
        return y.astype(np.float32) if y.dtype == np.float16 else y

    def deactivate(self):
        self.session = None

    def describe(self):
        return {**super().describe(), "provider": self.providers[0]}


@register_runner("slowed")
class SlowedRunner(Runner):
    """Another runner made `factor` slower: after each call it busy-waits factor times that call's own duration, so the
    slowdown scales with the model's cost as more work of the same kind would. A stand-in for a regressed model, to
    check that a gate catches a slowdown of known size (tests, benchmarks/gate_fpr.py)."""

    def __init__(self, inner: Runner, factor: float):
        super().__init__(getattr(inner, "threads", 1))
        self.inner, self.factor = inner, factor

    def activate(self):
        self.inner.activate()
        return self

    def deactivate(self):
        self.inner.deactivate()

    def infer(self, x):
        import time

        t0 = time.perf_counter()
        y = self.inner.infer(x)
        end = time.perf_counter() + self.factor * (time.perf_counter() - t0)
        while time.perf_counter() < end:
            pass
        return y

    def describe(self):
        return self.inner.describe()


# TensorRT (compressor/runtime/tensorrt.py) by name only: importing it stays the caller's choice
register_runner("tensorrt", lazy="compressor.runtime.tensorrt:TensorRTRunner")

# ONNX Runtime execution providers by what the user asks for, best first; CPU always last as the fallback.
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def pick_providers(wanted: str = "cpu", available: list[str] | None = None) -> list[str]:
    """The execution providers for `wanted` (cpu | cuda | tensorrt | auto) that this ONNX Runtime build has.
    auto: TensorRT, then CUDA, then CPU, whichever exist. Asking for cuda/tensorrt where the build lacks them is an error."""
    from ..errors import CompressError

    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if wanted == "auto":
        return [p for p in PROVIDERS["tensorrt"] if p in available] or ["CPUExecutionProvider"]
    if wanted not in PROVIDERS:
        raise CompressError(f"unknown execution provider choice '{wanted}'", hint="choose cpu, cuda, tensorrt or auto")
    if PROVIDERS[wanted][0] not in available:
        raise CompressError(f"this ONNX Runtime has no {PROVIDERS[wanted][0]} (it has {', '.join(available)})",
                            hint="install onnxruntime-gpu on a machine with an NVIDIA GPU, or bench with --providers cpu")
    return [p for p in PROVIDERS[wanted] if p in available]


@register_runner("teacher")
class TeacherRunner(Runner):
    """A loaded Teacher through its own logits(), so teachers exported with a fixed batch size run too."""

    def __init__(self, teacher, threads: int = 1, num_classes: int | None = None):
        super().__init__(threads)
        self.teacher, self.num_classes = teacher, num_classes
        self.format = "onnx" if teacher.session is not None else "pytorch"
        self.runtime = teacher.runtime
        if hasattr(teacher, "answers"):  # a black box (callable or command): only its answers, as class scores
            self.format, self._inner = teacher.format, Runner(threads)
        else:
            self._inner = OnnxRuntimeRunner(teacher.path, threads) if teacher.session is not None else TorchRunner(teacher.module, threads)

    def activate(self):
        self._inner.activate()
        if self.teacher.session is not None:
            self._saved, self.teacher.session = self.teacher.session, self._inner.session  # the thread-pinned session
        return self

    def infer(self, x):
        if hasattr(self.teacher, "answers"):
            y = self.teacher.answers(x, batch_size=max(1, len(x)))
            # class ids become one-hot scores: their argmax is the answer (the width only needs to cover it)
            if y.ndim == 1:
                width = self.num_classes or int(y.max(initial=0)) + 1
                if len(y) and y.max() >= width:
                    from ..errors import CompressError

                    raise CompressError(f"{self.teacher.name} answered class {int(y.max())}, but the run has {width} classes")
                return np.eye(width, dtype=np.float32)[y]
            return y
        return self.teacher.logits(x, batch_size=max(1, len(x)))

    def deactivate(self):
        if self.teacher.session is not None:
            self.teacher.session = self._saved
        self._inner.deactivate()

    def describe(self):
        d = {**self._inner.describe(), "fixed_batch": self.teacher.fixed_batch}
        if hasattr(self.teacher, "answers"):
            d.update(format=self.format, runtime=self.runtime)
        return d


def infer_batched(runner: Runner, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Run every row of x through the runner in batches; returns float32 outputs."""
    from ..data.streaming import iter_batches  # an image folder's rows are decoded in worker processes, a batch at a time

    return np.concatenate([np.asarray(runner.infer(np.ascontiguousarray(xb)), np.float32) for xb in iter_batches(x, batch_size)])
