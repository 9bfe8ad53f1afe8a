"""Graph simplification with onnxslim (chosen over onnx-simplifier in benchmarks/results/export_simplify.md):
constant folding, dead-node removal and pattern fusions on the exported graph. The caller checks the result
structurally and numerically like any other transformation."""
from __future__ import annotations

import warnings
from pathlib import Path

TOOL = "onnxslim"


def tool_version() -> str:
    import importlib.metadata as md

    try:
        return f"{TOOL} {md.version(TOOL)}"
    except md.PackageNotFoundError:
        return f"{TOOL} (not installed)"


def simplify_onnx(src: Path, dst: Path) -> dict:
    """Write the simplified graph of src to dst. A simplifier that raises writes nothing and says why
    (applied False, reason): the caller keeps the unsimplified graph."""
    import onnx

    model = onnx.load(str(src))
    info = {"tool": tool_version(), "applied": False, "reason": None, "nodes_before": len(model.graph.node), "nodes_after": None}
    try:
        import onnxslim

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = onnxslim.slim(model)
        if not isinstance(out, onnx.ModelProto):
            raise RuntimeError(f"{TOOL} returned {type(out).__name__}, not a model")
    except ImportError as exc:
        info["reason"] = f"{TOOL} cannot be imported ({exc}); install it with: pip install {TOOL}"
        return info
    except Exception as exc:  # any failure inside the simplifier: fall back to the exported graph, keep the reason
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        info["reason"] = f"{TOOL} raised {type(exc).__name__}{': ' + first if first else ''}"
        return info
    onnx.save(out, str(dst))
    info.update(applied=True, nodes_after=len(out.graph.node))
    return info
