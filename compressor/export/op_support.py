"""Which operation failed and where: the student module behind an op the exporter rejects, and the graph nodes
a target's runtime cannot run (TensorRT: the onnx-tensorrt operator list shipped in data/; ONNX Runtime: its
own session creation, whose error names the node)."""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from ..errors import CompressError

_DATA = Path(__file__).parent / "data"
# What to use instead of ops that have no ONNX export at all (the exporter's error names the aten op).
_ALTERNATIVES = {
    "kthvalue": "torch.topk or torch.sort", "median": "torch.sort and indexing", "nanmedian": "torch.sort and indexing",
    "unique": "a fixed-size torch.topk", "unique_dim": "a fixed-size torch.topk", "bincount": "one_hot(...).sum(0)",
    "histc": "comparisons and sum", "searchsorted": "comparisons and sum", "stft": "a Conv1d with fixed DFT weights",
    "fft_fft": "a matmul with fixed DFT weights", "fft_rfft": "a matmul with fixed DFT weights",
    "adaptive_max_pool2d": "an output size that divides the input (e.g. AdaptiveMaxPool2d(1), or MaxPool2d with a fixed kernel)",
    "adaptive_max_pool1d": "an output size that divides the input (e.g. AdaptiveMaxPool1d(1), or MaxPool1d with a fixed kernel)",
    "adaptive_avg_pool2d": "an output size that divides the input (e.g. AdaptiveAvgPool2d(1))",
}


# --- ops the exporter rejects ------------------------------------------------------------------------
def export_failure(exc: Exception, module, sample, opset: int) -> CompressError:
    """A CompressError for a failed torch.onnx.export: the aten op, the student module that runs it, what to do."""
    text = str(exc).strip()
    first = text.splitlines()[0][:300] if text else type(exc).__name__
    first = first.split(" Please feel free to request support")[0]  # the TorchScript exporter's boilerplate
    m = (re.search(r"operator '(?:aten::)?([\w.]+)'", text) or re.search(r"aten::([\w.]+)", text)
         or re.search(r"ONNX export of operator (\w+)", text) or re.search(r"\baten\.(\w+)", text))
    op = m.group(1).split(".")[0] if m else None
    if op and op not in first:  # the torch.export-based exporter leads with boilerplate: show the line that names the op
        first = next((ln.strip()[:300] for ln in text.splitlines() if op in ln), first)
    where = locate_op(module, sample, op) if op else None
    message = f"the student cannot be exported to ONNX (opset {opset}): {first}" + (f" [in module {where}]" if where else "")
    added = re.search(r"added in (?:opset )?version (\d+)", text)
    if added:
        hint = (f"export with --opset {added.group(1)} if the target's runtime reads that opset, "
                f"or replace the unsupported operation aten::{op} in {where or 'the student'}")
    elif op:
        alt = f" (e.g. with {_ALTERNATIVES[op]})" if op in _ALTERNATIVES else ""
        hint = f"replace the unsupported operation aten::{op} in {where or 'the student'}{alt}, or try another --opset"
    else:
        hint = "replace the unsupported operation in the student, or try another --opset"
    return CompressError(message, hint=hint, kind="runtime")


def locate_op(module, sample, op: str) -> str | None:
    """'path (Class)' of the innermost student module whose forward runs aten::op, found by running one forward
    with module hooks and a dispatch mode that sees every aten call; None when the op never runs."""
    import numpy as np
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    if isinstance(module, torch.jit.ScriptModule):  # a run's TorchScript copy of the student takes no hooks
        return None
    names = {m: n for n, m in module.named_modules()}
    stack, found = [], []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not found and func._schema.name.split("::")[-1] == op and stack:
                found.append(stack[-1])
            return func(*args, **(kwargs or {}))

    def enter(mod, args):
        stack.append(mod)

    def leave(mod, args, output):  # returns None: a forward hook's return value would replace the output
        stack.pop()

    hooks = [h for m in names for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.no_grad(), Spy():
            module.eval()(torch.from_numpy(np.ascontiguousarray(sample[:2])))
    except Exception:
        pass  # the location is a courtesy: the exporter's own error is what we report
    finally:
        for h in hooks:
            h.remove()
    if not found:
        return None
    mod = found[0]
    return f"'{names[mod]}' ({type(mod).__name__})" if names[mod] else f"the student's own forward ({type(mod).__name__})"


def module_of_node(node_name: str, module_names=()) -> str | None:
    """The student module a node came from: the TorchScript exporter names nodes by scope, '/encoder/layers.0/self_attn/MatMul'."""
    parts = [p for p in node_name.split("/") if p][:-1]
    if not parts:
        return None
    known, path = set(module_names), ""
    for p in parts:
        cand = f"{path}.{p}" if path else p
        path = cand if cand in known or not known else p if p in known else cand
    return path


# --- ops the target's runtime cannot run -------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def tensorrt_ops(version: str) -> dict | None:
    """The onnx-tensorrt operator list that covers this TensorRT version (None: we ship none for it)."""
    if not str(version).startswith("10."):
        return None
    return json.loads((_DATA / "tensorrt-10.3-ops.json").read_text(encoding="utf-8"))


def check_runtime_ops(path: Path, target: dict, opset: int, module_names=(), produced_by: str = "export") -> dict:
    """Refuse a graph with nodes the target's runtime cannot run; returns what was checked for the stage's result.

    TensorRT targets: every node's op type against the shipped operator list. ONNX Runtime targets: session
    creation is the check (done by the numeric check, which opens a session on every graph)."""
    import onnx

    rt = target["runtime"]
    if rt["name"] != "tensorrt":
        return {"runtime": rt["name"], "method": "ONNX Runtime session creation on the CPU execution provider"}
    version = rt.get("version", "")
    table = tensorrt_ops(version)
    if table is None:
        return {"runtime": f"tensorrt {version}".strip(), "method": "not checked: no operator list for this TensorRT version"}
    lo, hi = table["opset_range"]
    if not lo <= opset <= hi:
        raise CompressError(f"TensorRT {version} reads ONNX opsets {lo} to {hi}, but the export uses opset {opset}",
                            hint=f"pass --opset {min(max(opset, lo), hi)} (or leave --opset out to use the target's)")
    model = onnx.load(str(path), load_external_data=False)
    supported = set(table["supported"])
    bad = [n for n in model.graph.node if n.domain not in ("", "ai.onnx") or n.op_type not in supported]
    ops = sorted({n.op_type for n in model.graph.node})
    if bad:
        n = bad[0]
        mod = module_of_node(n.name, module_names)
        op = f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        others = sorted({b.op_type for b in bad[1:]} - {n.op_type})
        also = "; also unsupported: " + ", ".join(others) if others else ""
        raise CompressError(
            f"TensorRT {version} cannot run node '{n.name or '(unnamed)'}' (op {op}{f', module {mod}' if mod else ''}) of the "
            f"{produced_by} graph{also}",
            hint=f"replace the operation behind {op} in {mod or 'the student'} with one TensorRT supports "
                 f"(list: compressor/export/data/tensorrt-10.3-ops.json), or choose another --target", kind="runtime")
    notes = {op: table["restrictions"][op] for op in ops if op in table["restrictions"]}
    return {"runtime": f"tensorrt {version}", "method": f"op types against the onnx-tensorrt operator list for TensorRT {table['versions']}",
            "op_types": ops, "restrictions": notes}


def explain_ort_failure(err: CompressError, path: Path, module_names=(), produced_by: str = "export") -> CompressError:
    """Turn 'ONNX Runtime cannot load …' into a message naming the node, its op type and the student module."""
    import onnx

    text = err.message
    nodes = {n.name: n for n in onnx.load(str(path), load_external_data=False).graph.node}
    node = None
    m = re.search(r"node with name '([^']*)'", text) or re.search(r"in node \(([^)]*)\)", text)
    if m and m.group(1) in nodes:
        node = nodes[m.group(1)]
    else:
        m = re.search(r"([\w.]*):(\w+)\(-?\d+\) is not a registered function/op", text) or re.search(r"implementation for (\w+)\(", text)
        op = m.group(m.lastindex) if m else None
        node = next((n for n in nodes.values() if n.op_type == op), None) if op else None
    detail = text.split(": ", 1)[1] if ": " in text else text
    if node is None:
        return CompressError(f"ONNX Runtime cannot run the {produced_by} graph: {detail}",
                             hint="replace the unsupported operation in the student, or try another --opset", kind="runtime")
    mod = module_of_node(node.name, module_names)
    op = f"{node.domain}:{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
    return CompressError(f"ONNX Runtime cannot run node '{node.name}' (op {op}{f', module {mod}' if mod else ''}) of the {produced_by} graph: {detail}",
                         hint=f"replace the operation behind {op} in {mod or 'the student'}, or try another --opset", kind="runtime")
