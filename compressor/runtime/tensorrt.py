"""A TensorRT engine behind the Runner interface (activate / infer / describe / deactivate).

TensorRT and the CUDA binding are imported in activate(), never with this module; when either or the GPU is
missing, activate() raises CompressError saying what to install."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CompressError
from . import Runner, trt_core
from .registry import register_runner


@register_runner("tensorrt")
class TensorRTRunner(Runner):
    """A serialized engine (.engine / .plan) run with execute_async_v3; each run's GPU time is kept from CUDA events."""

    format = "tensorrt"
    runtime = "tensorrt"
    device = "cuda"

    def __init__(self, engine_path: str | Path, threads: int = 1):
        super().__init__(threads)
        self.path = Path(engine_path)
        self._inner: trt_core.EngineRunner | None = None
        self._times: list[float] = []

    def activate(self):
        from ..export.tensorrt import compress_error

        if not self.path.is_file():
            raise CompressError(f"TensorRT engine {self.path} does not exist", hint="build it first (build_engine.sh in the deploy bundle, or compressor.export.tensorrt.build_engine)")
        try:
            self._inner = trt_core.EngineRunner(self.path).activate()
        except (trt_core.TensorRTUnavailable, trt_core.EngineError) as exc:
            raise compress_error(exc) from None
        return self

    def infer(self, x: np.ndarray) -> np.ndarray:
        from ..export.tensorrt import compress_error

        try:
            return self._inner.infer(x)
        except trt_core.EngineError as exc:
            raise compress_error(exc) from None

    @property
    def gpu_times_ms(self) -> list[float]:
        """GPU time of every infer() so far, from CUDA events around execute_async_v3."""
        return self._inner.gpu_times_ms if self._inner else self._times

    def deactivate(self):
        if self._inner is not None:
            self._described = self._inner.describe()  # describe() is asked after the runner is closed, too
            self._times = self._inner.gpu_times_ms
            self._inner.deactivate()
            self._inner = None

    def describe(self):
        d = {**super().describe(), "engine": str(self.path)}
        d.update(self._inner.describe() if self._inner is not None else getattr(self, "_described", {}))
        return d
