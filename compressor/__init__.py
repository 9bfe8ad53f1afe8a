"""compressor: distil a large trained model into a small student, export it to ONNX/TensorRT with
INT8/FP16, and measure every variant against the teacher. Importing it loads no heavy library."""
from __future__ import annotations

from .version import __version__

_API = {"compress", "distill", "export", "quantize", "bench", "report", "bundle"}
_CONFIGS = {"CompressConfig", "DataConfig", "DistillConfig", "ExportConfig", "QuantizeConfig", "BenchConfig"}

from .errors import CompressError  # noqa: E402  (light: no third-party imports)


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    if name in _CONFIGS:
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")


__all__ = sorted(_API | _CONFIGS | {"CompressError", "__version__"})
