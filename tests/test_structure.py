"""The package's shape: no import cycles between its modules, no module reaching into another's private names, no
function too tangled to hold in one's head, and one `compress` run loading the teacher and the data once."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "compressor"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Every import between the package's modules, those inside functions included (a lazy import still ties the
    two modules together), and every import of another module's `_name` (dunders such as __version__ aside; a
    package's own `_module`s may be imported by the package itself)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for mod, f in mods.items():
        package = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                edges[mod].update(a.name for a in node.names if a.name in mods and a.name != mod)
                continue
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("compressor"):
                continue
            for a in node.names:
                full = f"{target}.{a.name}"
                dest = full if full in mods else target
                if dest in mods and dest != mod:
                    edges[mod].add(dest)
                name_private = a.name.startswith("_") and not (a.name.startswith("__") and a.name.endswith("__"))
                if name_private and full not in mods:
                    private.append(f"{mod} imports {a.name} from {target}")
                # a private module (data/_npz.py) is its package's business only
                hidden = [p for p in dest.split(".") if p.startswith("_") and not p.startswith("__")]
                if hidden and dest != mod and not mod.startswith(dest.rsplit(".", 1)[0] + ".") and mod != dest.rsplit(".", 1)[0]:
                    private.append(f"{mod} imports from the private module {dest}")
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    edges, _ = _imports(_modules())
    assert _cycles(edges) == []


def test_no_module_imports_another_modules_private_names():
    _, private = _imports(_modules())
    assert private == []


def test_the_scan_sees_a_cycle_and_a_private_import(tmp_path):
    """The checks above can fail: a two-module cycle and a private import are found."""
    mods = {"compressor.a": tmp_path / "a.py", "compressor.b": tmp_path / "b.py"}
    mods["compressor.a"].write_text("def f():\n    from .b import _g\n")
    mods["compressor.b"].write_text("from compressor import a\n")
    edges, private = _imports(mods)
    assert _cycles(edges) == [["compressor.a", "compressor.b"]]
    assert private == ["compressor.a imports _g from compressor.b"]


def test_no_function_rates_e_or_f_in_cyclomatic_complexity():
    """radon's grades: A-B simple, C-D tangled but readable, E-F too tangled to hold in one's head."""
    import radon.complexity as cc  # a dev dependency: CI installs it, so this check never skips there
    worst = []
    for f in sorted(PKG.rglob("*.py")):
        for block in cc.cc_visit(f.read_text()):
            if cc.cc_rank(block.complexity) in "EF":
                worst.append(f"{f.relative_to(PKG.parent)}:{block.lineno} {block.fullname} ({block.complexity})")
    assert worst == []


def test_compress_loads_the_teacher_and_the_data_once(tmp_path, monkeypatch):
    """One `compress` run on the built-in example: the teacher loaded once, the data loaded once, the teacher file
    read (hashed) once, though five stages use them."""
    import compressor.data as data_mod
    import compressor.models as models_mod
    import compressor.run as run_mod
    from compressor import api
    from compressor.config import BenchConfig, CompressConfig

    counts = {"teacher": 0, "data": 0, "hash": []}
    real_teacher, real_data, real_hash = models_mod.load_teacher, data_mod.load_data, run_mod.sha256_file

    def teacher(*a, **k):
        counts["teacher"] += 1
        return real_teacher(*a, **k)

    def data(*a, **k):
        counts["data"] += 1
        return real_data(*a, **k)

    def hashed(path, *a, **k):
        counts["hash"].append(Path(path).name)
        return real_hash(path, *a, **k)

    monkeypatch.setattr(models_mod, "load_teacher", teacher)
    monkeypatch.setattr(data_mod, "load_data", data)
    monkeypatch.setattr(run_mod, "sha256_file", hashed)
    monkeypatch.setattr(run_mod, "_HASHES", {})  # hashes remembered by earlier tests in this process do not count
    cfg = CompressConfig(target="cpu")
    cfg.distill = cfg.distill.replace(steps=30, baseline=False)
    cfg.quantize = cfg.quantize.replace(qat_steps=0)
    cfg.bench = BenchConfig(threads=1, min_runs=3, min_duration_s=0.0, warmup_ms=0.0, warmup_runs=1)
    rep = api.compress(cfg, tmp_path / "run")
    assert {m["name"] for m in rep["models"]} >= {"teacher", "student", "student onnx fp32", "student onnx int8"}
    assert counts["teacher"] == 1 and counts["data"] == 1, counts
    assert counts["hash"].count("demo_teacher.pt") == 1, counts["hash"]
