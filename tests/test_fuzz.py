"""Fuzzing every loader and parser: whatever bytes or values come in, the only exception that escapes is
CompressError. Property-based tests (Hypothesis) for .npz data, image folders, target profiles and
report.json, plus a bounded mutation run (@slow) over real files of every kind. The number of inputs
tried is printed at the end of the pytest run ("fuzz: N inputs tried")."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from compressor.bench.report import load_report, render_markdown
from compressor.config import DataConfig
from compressor.data import load_data
from compressor.errors import CompressError
from compressor.targets import load_profile
from conftest import FUZZ_SECONDS, fuzz_count

REPORT = Path(__file__).resolve().parent / "data" / "report.json"  # a real report.json written by `compress`
TARGETS = Path(__file__).resolve().parent.parent / "targets"
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _only_compress_error(fn, *args, **kw):
    """fn's result, or None when it raised CompressError; anything else fails the test."""
    try:
        out = fn(*args, **kw)
    except CompressError as exc:
        assert exc.kind in ("input", "runtime"), exc
        assert str(exc).strip(), "an error must say something"
        _event("refused")
        return None
    _event("loaded")
    return out


def _event(what: str) -> None:
    try:
        event(what)  # shown by --hypothesis-show-statistics
    except Exception:  # outside a Hypothesis test (the mutation run)
        pass


# --- .npz -------------------------------------------------------------------------------------------
_dtypes = st.sampled_from(["float32", "float64", "float16", "int8", "int64", "uint8", "bool", "complex64", "<U3", "V4"])


@st.composite
def _npz_arrays(draw):
    """Often a valid data set with one thing wrong (or nothing), sometimes arrays of any kind."""
    if draw(st.booleans()):
        n, m, length = draw(st.integers(1, 12)), draw(st.integers(1, 6)), draw(st.integers(1, 4))
        floats = st.floats(-1e6, 1e6, width=32)
        out = {"x": draw(hnp.arrays(np.float32, (n, length), elements=floats)),
               "y": draw(hnp.arrays(np.int64, (n,), elements=st.integers(-1, 3))),
               "x_test": draw(hnp.arrays(np.float32, (m, length), elements=floats)),
               "y_test": draw(hnp.arrays(np.int64, (m,), elements=st.integers(0, 3)))}
        if draw(st.booleans()):  # break one array: another dtype or shape, a bad value, or gone
            key = draw(st.sampled_from(sorted(out)))
            how = draw(st.sampled_from(["dtype", "shape", "value", "empty", "drop"]))
            if how == "dtype":
                out[key] = out[key].astype(draw(_dtypes))
            elif how == "shape":
                out[key] = out[key].reshape(-1) if out[key].ndim > 1 else out[key][:, None]
            elif how == "value" and out[key].size:
                bad = draw(st.sampled_from([np.nan, np.inf, -np.inf]) if key.startswith("x") else st.sampled_from([-2, -1, 99]))
                out[key].flat[draw(st.integers(0, out[key].size - 1))] = bad
            elif how == "empty":
                out[key] = out[key][:0]
            else:
                del out[key]
        return out
    n = draw(st.integers(0, 12))
    names = draw(st.lists(st.sampled_from(["x", "y", "x_test", "y_test", "extra"]), unique=True, max_size=5))
    out = {}
    for name in names:
        dtype = np.dtype(draw(_dtypes))
        rows = n if draw(st.booleans()) else draw(st.integers(0, 12))
        tail = draw(st.lists(st.integers(0, 4), max_size=3))
        if dtype.kind in "fiub":
            elements = None
            if dtype.kind == "f":
                elements = st.floats(allow_nan=True, allow_infinity=True, width=dtype.itemsize * 8)
            elif dtype.kind == "i":
                elements = st.integers(-3, 5)
            out[name] = draw(hnp.arrays(dtype, (rows, *tail), elements=elements))
        else:
            out[name] = np.zeros((rows, *tail), dtype)
    return out


@FAST
@given(arrays=_npz_arrays())
def test_npz_with_any_arrays_loads_valid_data_or_says_why(tmp_path, arrays):
    fuzz_count("hypothesis:npz")
    p = tmp_path / "f.npz"
    np.savez(p, **arrays)
    ds = _only_compress_error(load_data, DataConfig(source=str(p)))
    if ds is not None:  # whatever loads is clean
        if ds.token_ids:  # integer x: token ids, int64 and >= 0 in both sets
            assert ds.x.dtype == ds.x_test.dtype == np.int64 and (ds.x >= 0).all() and (ds.x_test >= 0).all()
        else:
            assert ds.x.dtype == ds.x_test.dtype == np.float32 and np.isfinite(ds.x).all() and np.isfinite(ds.x_test).all()
        assert (ds.y >= -1).all() and (ds.y >= 0).any() and (ds.y_test >= 0).all() and len(ds.y_test) > 0


# --- image folders ----------------------------------------------------------------------------------
_image = st.tuples(
    st.sampled_from(["1", "L", "P", "RGB", "RGBA", "I;16", "CMYK", "garbage", "empty"]),
    st.sampled_from([".png", ".jpg", ".bmp", ".gif", ".tiff", ".webp"]),
    st.integers(1, 9), st.integers(1, 9), st.binary(max_size=64),
)


def _write_image(path: Path, spec) -> None:
    from PIL import Image

    mode, _, w, h, noise = spec
    if mode == "garbage":
        path.write_bytes(noise)
        return
    if mode == "empty":
        path.write_bytes(b"")
        return
    try:
        Image.new(mode, (w, h), 7).save(path)
    except (OSError, KeyError, ValueError):  # a mode this format cannot store: a damaged file instead
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + noise)


@FAST
@given(classes=st.lists(st.lists(_image, max_size=3), max_size=3), heldout=st.booleans(),
       size=st.none() | st.tuples(st.integers(1, 6), st.integers(1, 6)), channels=st.none() | st.sampled_from([1, 3]),
       mean=st.none() | st.lists(st.floats(-2, 2), min_size=1, max_size=4),
       std=st.none() | st.lists(st.floats(-1, 2), min_size=1, max_size=4),
       teacher_shape=st.none() | st.sampled_from([(None, 1, 5, 5), (None, 3, 4, 6), (None, 2, 3, 3), (None, 16)]))
def test_image_folder_of_anything_loads_or_says_why(tmp_path_factory, classes, heldout, size, channels, mean, std, teacher_shape):
    fuzz_count("hypothesis:image-folder")
    root = tmp_path_factory.mktemp("imgs")
    train = root / "train"
    train.mkdir()
    for ci, images in enumerate(classes):
        d = train / f"c{ci}"
        d.mkdir()
        for i, spec in enumerate(images):
            _write_image(d / f"{i}{spec[1]}", spec)
    if heldout and classes:
        d = root / "test" / "c0"
        d.mkdir(parents=True)
        _write_image(d / "0.png", ("L", ".png", 4, 4, b""))
    cfg = DataConfig(source=str(train), image_size=list(size) if size else None, channels=channels, mean=mean, std=std)
    ds = _only_compress_error(load_data, cfg, teacher_input_shape=teacher_shape)
    if ds is not None:
        assert ds.x.ndim == 4 and ds.x.shape[1] in (1, 3) and np.isfinite(ds.x).all()


# --- target profiles (TOML) -----------------------------------------------------------------------------
def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def _to_toml(d: dict) -> str:
    return "".join(f"{json.dumps(str(k))} = {_toml_value(v)}\n" for k, v in d.items())


_scalar = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=12)
_json_value = st.recursive(_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _mutate(data, obj, value_strategy, max_ops=4):
    """Apply a few random edits to a JSON-like tree: replace a value, delete a key or item, add a key."""
    obj = json.loads(json.dumps(obj))
    for _ in range(data.draw(st.integers(1, max_ops), label="ops")):
        paths = [p for p in _paths(obj) if p]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        op = data.draw(st.sampled_from(["replace", "delete", "add"]), label="op")
        if op == "replace":
            parent[path[-1]] = data.draw(value_strategy, label="value")
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=8), label="key")] = data.draw(value_strategy, label="value")
    return obj


def _toml_safe(v):
    """TOML has no null: drop None values (the mutation then tests 'missing' instead)."""
    if isinstance(v, dict):
        return {k: _toml_safe(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_toml_safe(x) for x in v if x is not None]
    return v


@FAST
@given(data=st.data(), name=st.sampled_from(sorted(p.name for p in TARGETS.glob("*.toml"))))
def test_mutated_target_profile_loads_or_says_why(tmp_path, data, name):
    import tomllib

    fuzz_count("hypothesis:target-toml")
    profile = tomllib.loads((TARGETS / name).read_text())
    mutated = _toml_safe(_mutate(data, profile, _json_value))
    p = tmp_path / "mine.toml"
    p.write_text(_to_toml(mutated), encoding="utf-8")
    got = _only_compress_error(load_profile, p)
    if got is not None:
        assert isinstance(got["runtime"]["onnx_opset"], int) and got["quantization"]["int8_recipe"]


@FAST
@given(text=st.text(max_size=300) | st.binary(max_size=300))
def test_any_text_as_a_target_profile_loads_or_says_why(tmp_path, text):
    fuzz_count("hypothesis:target-toml")
    p = tmp_path / "mine.toml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    _only_compress_error(load_profile, p)


# --- report.json (what the gate reads) --------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_report() -> dict:
    return load_report(REPORT)  # the committed fixture is itself valid


@FAST
@given(data=st.data())
def test_mutated_report_loads_or_says_why(tmp_path, real_report, data):
    fuzz_count("hypothesis:report-json")
    mutated = _mutate(data, real_report, _json_value)
    p = tmp_path / "report.json"
    try:
        p.write_text(json.dumps(mutated))
    except ValueError:  # NaN/Inf in the mutation: json.dumps writes them as NaN/Infinity tokens anyway
        return
    rep = _only_compress_error(load_report, p)
    if rep is not None:  # a report that passes the schema can be rendered
        render_markdown(rep)


@FAST
@given(blob=st.binary(max_size=400) | _json_value.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_as_a_report_load_or_say_why(tmp_path, blob):
    fuzz_count("hypothesis:report-json")
    p = tmp_path / "report.json"
    p.write_bytes(blob)
    _only_compress_error(load_report, p)


def test_a_folder_or_missing_file_as_profile_or_report(tmp_path):
    for fn in (load_profile, load_report):
        with pytest.raises(CompressError):
            fn(tmp_path)
        with pytest.raises(CompressError):
            fn(tmp_path / "missing.file")


# --- the bounded mutation run over real files -------------------------------------------------------------
MUTATION_BUDGET = {"npz": 2000, "torchscript": 1200, "onnx": 1500, "report-json": 2000, "target-toml": 2000}


def _mutations(blob: bytes, rng: np.random.Generator, n: int):
    """n damaged copies: truncations, byte flips, a spliced random run, or a mix."""
    for _ in range(n):
        b = bytearray(blob)
        how = rng.integers(0, 4)
        if how in (0, 3):
            b = b[: rng.integers(0, len(b))]
        if how in (1, 3) and len(b):
            for i in rng.integers(0, len(b), rng.integers(1, 9)):
                b[i] ^= int(rng.integers(1, 256))
        if how == 2 and len(b):
            i = int(rng.integers(0, len(b)))
            b[i:i + int(rng.integers(1, 32))] = rng.bytes(int(rng.integers(0, 32)))
        yield bytes(b)


@pytest.mark.slow
def test_mutation_run_over_real_files_raises_only_compress_error(tiny, tmp_path):
    """At least 5,000 damaged real files (npz data, TorchScript and ONNX teachers, report.json, target TOML):
    each loads or raises CompressError, never anything else."""
    from compressor.models import load_teacher

    rng = np.random.default_rng(20261125)
    x2 = tiny.x_test[:2]

    def teacher(p):
        t = load_teacher(p)
        t.logits(x2)

    def npz(p):
        ds = load_data(DataConfig(source=str(p)))
        assert np.isfinite(ds.x).all() and (ds.y >= -1).all()

    def report(p):
        rep = load_report(p)
        render_markdown(rep)

    cases = {
        "npz": (tiny.npz.read_bytes(), ".npz", npz),
        "torchscript": (tiny.torchscript.read_bytes(), ".pt", teacher),
        "onnx": (tiny.onnx.read_bytes(), ".onnx", teacher),
        "report-json": (REPORT.read_bytes(), ".json", report),
        "target-toml": ((TARGETS / "jetson-orin-nano-8gb.toml").read_bytes(), ".toml", load_profile),
    }
    total, t_all = 0, time.perf_counter()
    failures = []
    for kind, (blob, suffix, fn) in cases.items():
        t0 = time.perf_counter()
        for i, mutant in enumerate(_mutations(blob, rng, MUTATION_BUDGET[kind])):
            p = tmp_path / f"m{i % 4}{suffix}"
            p.write_bytes(mutant)
            try:
                _only_compress_error(fn, p)
            except Exception as exc:  # keep going: report every kind of escape at once
                bad = tmp_path / f"escape-{kind}-{len(failures)}{suffix}"
                bad.write_bytes(mutant)
                failures.append(f"{kind} #{i}: {type(exc).__name__}: {str(exc)[:200]} (saved as {bad})")
        fuzz_count(f"mutation:{kind}", MUTATION_BUDGET[kind])
        FUZZ_SECONDS[f"mutation:{kind}"] = time.perf_counter() - t0
        total += MUTATION_BUDGET[kind]
    seconds = time.perf_counter() - t_all
    print(f"mutation run: {total} damaged files in {seconds:.1f}s")
    assert not failures, "\n".join(failures[:20])
    assert total >= 5000
