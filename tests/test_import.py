"""Importing the package (and the CLI module) has no side effects: no torch, ONNX Runtime or TensorRT."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ["torch", "onnxruntime", "tensorrt", "onnx", "jsonschema"]


def _loaded_after(code: str) -> dict:
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    "import compressor",
    "import compressor; compressor.CompressError; compressor.__version__",
    "from compressor import DistillConfig, CompressConfig; CompressConfig().to_dict()",
    "import compressor.config, compressor.errors, compressor._io",
])
def test_import_loads_no_heavy_library(code):
    loaded = _loaded_after(code)
    assert not any(loaded[m] for m in ("torch", "onnxruntime", "tensorrt")), loaded


def test_lazy_api_attribute_resolves():
    import compressor

    assert callable(compressor.compress) and compressor.DistillConfig.__name__ == "DistillConfig"
    with pytest.raises(AttributeError):
        compressor.not_a_thing  # noqa: B018
    assert set(compressor.__all__) >= {"compress", "CompressError", "BenchConfig"}
