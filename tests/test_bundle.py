"""The Jetson deploy bundle end to end on the tiny data: manifest and checksums, the tarball, build_engine.sh for
TensorRT 10.3 and 11 profiles (run against a stand-in trtexec), run_on_device.py through its ONNX Runtime fallback
without compressor importable, and `compress report --merge` folding the device's rows back into the run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from compressor import api
from compressor._io import safe_extract, sha256_file
from compressor.bench.report import load_report, validate_report
from compressor.bundle import build_engine_script, validate_manifest
from compressor.errors import CompressError

from conftest import CLASSES, LENGTH, N_TEST, ROOT, make_finished_run

TARGET = "jetson-orin-nano-8gb"
DEVICE_FLAGS = ["--min-runs", "5", "--min-duration", "0.01", "--warmup-ms", "1"]


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory) -> Path:
    return make_finished_run(tiny, tmp_path_factory.mktemp("bundle") / "run", "jetson")


@pytest.fixture(scope="module")
def bundle10(finished_run) -> Path:
    info = api.bundle(finished_run)
    return Path(info["dir"])


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _copy_run(run: Path, dst: Path, **manifest_changes) -> Path:
    shutil.copytree(run, dst)
    m = json.loads((dst / "manifest.json").read_text())
    for key, fn in manifest_changes.items():
        fn(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _run_device_script(folder: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    """run_on_device.py in a fresh interpreter where importing compressor fails: the script must not need it."""
    code = ("import runpy, sys\n"
            "sys.modules['compressor'] = None\n"
            f"sys.argv = ['run_on_device.py', *{list(map(str, args))!r}]\n"
            f"runpy.run_path({str(folder / 'run_on_device.py')!r}, run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd)


def _trtexec_stub(tmp: Path) -> tuple[Path, Path]:
    """A stand-in trtexec that records its arguments and writes the --saveEngine file."""
    log = tmp / "trtexec.log"
    stub = tmp / "trtexec"
    stub.write_text('#!/usr/bin/env bash\necho "$*" >> "$TRTEXEC_LOG"\n'
                    'for a in "$@"; do case "$a" in --saveEngine=*) echo engine > "${a#--saveEngine=}";; esac; done\n')
    stub.chmod(0o755)
    return stub, log


def _run_build_script(folder: Path, tmp: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    stub, log = _trtexec_stub(tmp)
    env = {**os.environ, "TRTEXEC": str(stub), "TRTEXEC_LOG": str(log)}
    proc = subprocess.run(["bash", str(folder / "build_engine.sh")], capture_output=True, text=True, timeout=120, env=env, cwd=tmp)
    return proc, (log.read_text().splitlines() if log.exists() else [])


def _trtexec_lines(script: str) -> dict[str, str]:
    """The trtexec command of each engine in build_engine.sh, keyed by the engine file."""
    out = {}
    for line in script.splitlines():
        if line.startswith('"$TRTEXEC"'):
            engine = next(a for a in line.split() if a.startswith("--saveEngine="))
            out[engine.split("=", 1)[1]] = line
    return out


# --- the bundle's content -----------------------------------------------------------------------------
def test_manifest_validates_and_describes_the_run(bundle10, finished_run, tiny):
    m = validate_manifest(_manifest(bundle10))
    assert m["bundle"] == f"bundle-{TARGET}" and bundle10.name == m["bundle"]
    assert m["input"] == {"name": "input", "shape": ["batch", LENGTH], "dtype": "float32"}
    assert m["output"] == {"name": "logits", "shape": ["batch", CLASSES], "dtype": "float32"}
    assert m["classes"] == {"names": list(range(CLASSES)), "kind": "indices"}  # .npz data has no class names
    assert m["target"]["name"] == TARGET and m["target"]["tensorrt_version"] == "10.3"
    assert m["preprocessing"]["source"] == "npz" and m["preprocessing"]["mean"] is None
    assert {"compressor", "torch", "onnx", "onnxruntime"} <= set(m["versions"])
    # the host accuracy of each ONNX model is the run report's
    rep = load_report(finished_run / "report.json")
    by_path = {r["path"]: r for r in rep["models"]}
    for name in ("student.onnx", "student.int8.onnx"):
        assert m["onnx"][name]["host_accuracy"] == by_path[name]["accuracy"]
        assert m["onnx"][name]["host_heldout_rows"] == N_TEST
    # the held-out rows are the run's, with the teacher's own predictions
    with np.load(bundle10 / "heldout.npz") as npz:
        x, y, tp, idx = npz["x"], npz["y"], npz["teacher_pred"], npz["index"]
    assert m["heldout"]["rows"] == len(y) == min(1000, N_TEST)
    np.testing.assert_array_equal(x, tiny.x_test[idx])
    np.testing.assert_array_equal(y, tiny.y_test[idx])
    import torch

    with torch.no_grad():
        np.testing.assert_array_equal(tp, tiny.module()(torch.from_numpy(x)).argmax(1).numpy())
    # the schema really checks: a damaged checksum is refused
    bad = json.loads(json.dumps(m))
    bad["files"]["student.onnx"]["sha256"] = "not-a-hash"
    with pytest.raises(CompressError, match="files/student.onnx/sha256"):
        validate_manifest(bad)


def test_every_checksum_matches_and_the_shipped_code_is_verbatim(bundle10):
    m = _manifest(bundle10)
    on_disk = {p.name for p in bundle10.iterdir()}
    assert on_disk == set(m["files"]) | {"manifest.json", "SHA256SUMS"}
    assert {"student.int8.onnx", "student.onnx", "build_engine.sh", "run_on_device.py", "latency.py", "trt_core.py", "heldout.npz"} <= on_disk
    for name, info in m["files"].items():
        assert sha256_file(bundle10 / name) == info["sha256"], name
        assert (bundle10 / name).stat().st_size == info["size_bytes"], name
    proc = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=bundle10, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "manifest.json: OK" in proc.stdout
    assert (bundle10 / "latency.py").read_bytes() == (ROOT / "compressor/bench/latency.py").read_bytes()
    assert (bundle10 / "trt_core.py").read_bytes() == (ROOT / "compressor/runtime/trt_core.py").read_bytes()
    assert os.access(bundle10 / "build_engine.sh", os.X_OK)


def test_tarball_holds_the_same_files(bundle10, tmp_path):
    tarball = bundle10.with_name(bundle10.name + ".tar.gz")
    with tarfile.open(tarball) as tar:
        names = {n for n in tar.getnames()}
    assert names == {f"{bundle10.name}/{p.name}" for p in bundle10.iterdir()}
    safe_extract(tarball, tmp_path)
    for p in bundle10.iterdir():
        assert (tmp_path / bundle10.name / p.name).read_bytes() == p.read_bytes(), p.name


# --- build_engine.sh ------------------------------------------------------------------------------------
def test_build_engine_script_for_tensorrt_10_3(bundle10, tmp_path):
    script = (bundle10 / "build_engine.sh").read_text()
    assert subprocess.run(["bash", "-n", str(bundle10 / "build_engine.sh")]).returncode == 0
    assert "set -euo pipefail" in script
    assert script.index("sha256sum -c") < script.index('"$TRTEXEC"')
    lines = _trtexec_lines(script)
    assert set(lines) == {"student.int8.engine", "student.fp16.engine", "student.fp32.engine"}
    assert "--onnx=student.int8.onnx" in lines["student.int8.engine"] and "--int8" in lines["student.int8.engine"]
    assert "--fp16" not in lines["student.int8.engine"]  # a Q/DQ graph needs INT8, nothing more
    # the run made an FP16 graph (the target takes FP16): its engine keeps the graph's types, no FP16 flag needed
    assert "--onnx=student.fp16.onnx" in lines["student.fp16.engine"] and "--stronglyTyped" in lines["student.fp16.engine"]
    assert "--fp16" not in lines["student.fp16.engine"]
    assert not any(f in lines["student.fp32.engine"] for f in ("--int8", "--fp16"))
    for name, line in lines.items():
        assert "--best" not in line and "--calib" not in line
        assert ("--stronglyTyped" in line) == (name == "student.fp16.engine")
        assert f"--minShapes=input:1x{LENGTH}" in line and f"--optShapes=input:1x{LENGTH}" in line
        assert f'--maxShapes=input:"${{MAX_BATCH}}"x{LENGTH}' in line  # only the variable is expanded, the data is quoted
    # run it against a stand-in trtexec: every engine is asked for, with the batch range expanded
    folder = tmp_path / "b"
    shutil.copytree(bundle10, folder)
    proc, calls = _run_build_script(folder, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(calls) == 3 and all(f"--maxShapes=input:32x{LENGTH}" in c for c in calls)
    assert {c.split()[1] for c in calls} == {f"--saveEngine=student.{p}.engine" for p in ("int8", "fp16", "fp32")}
    assert all((folder / f"student.{p}.engine").is_file() for p in ("int8", "fp16", "fp32"))


def test_build_engine_script_for_tensorrt_11_is_strongly_typed(finished_run, tmp_path):
    src = (ROOT / "targets" / f"{TARGET}.toml").read_text()
    profile = tmp_path / "orin-trt11.toml"
    profile.write_text(src.replace(f'name = "{TARGET}"', 'name = "orin-trt11"').replace('version = "10.3"', 'version = "11.0"')
                       .replace('aliases = ["jetson", "orin-nano"]', "aliases = []"))
    run = _copy_run(finished_run, tmp_path / "run", target=lambda m: m["config"].update(target=str(profile)))
    folder = Path(api.bundle(run)["dir"])
    m = validate_manifest(_manifest(folder))
    assert m["target"]["tensorrt_version"] == "11.0" and folder.name == "bundle-orin-trt11"
    # no FP16 flag in 11: the FP16 engine comes from the run's FP16 graph (precision in the graph)
    assert [(e["name"], e["onnx"]) for e in m["engines"]] == [("int8", "student.int8.onnx"), ("fp16", "student.fp16.onnx"), ("fp32", "student.onnx")]
    assert all(e["strongly_typed"] and e["builder_flags"] == [] for e in m["engines"])
    script = (folder / "build_engine.sh").read_text()
    assert subprocess.run(["bash", "-n", str(folder / "build_engine.sh")]).returncode == 0
    lines = _trtexec_lines(script)
    assert set(lines) == {"student.int8.engine", "student.fp16.engine", "student.fp32.engine"}
    for line in lines.values():
        assert "--stronglyTyped" in line
        assert not any(f in line for f in ("--int8", "--fp16", "--best"))
    # the same pure function, side by side for the two versions
    profile10 = {"description": "d", "runtime": {"version": "10.3"}}
    eng = [{"name": "int8", "description": "d", "onnx": "a.onnx", "engine": "a.engine", "trtexec_flags": ["--int8"]}]
    assert "--int8" in build_engine_script(profile10, eng, {"name": "input", "shape": ["batch", 4]})


def test_corrupted_file_is_caught_before_anything_runs(bundle10, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(bundle10, folder)
    onnx = folder / "student.int8.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    proc = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=folder, capture_output=True, text=True)
    assert proc.returncode != 0 and "student.int8.onnx: FAILED" in proc.stdout
    proc, calls = _run_build_script(folder, tmp_path)
    assert proc.returncode != 0 and calls == []  # trtexec never ran
    proc = _run_device_script(folder, "--runtime", "onnxruntime", *DEVICE_FLAGS, cwd=tmp_path)
    assert proc.returncode == 2 and "student.int8.onnx does not match its checksum" in proc.stderr
    assert not (folder / "report.json").exists()


# --- on the device (ONNX Runtime fallback) and back --------------------------------------------------------
@pytest.fixture(scope="module")
def device_run(finished_run, bundle10, tmp_path_factory):
    """A copy of the run and its bundle, and the report run_on_device.py wrote from it."""
    run = tmp_path_factory.mktemp("device") / "run"
    shutil.copytree(finished_run, run)
    folder = run / bundle10.name
    proc = _run_device_script(folder, "--runtime", "onnxruntime", *DEVICE_FLAGS, cwd=run.parent)
    assert proc.returncode == 0, proc.stderr
    return run, folder, folder / "report.json"


def test_device_script_writes_a_valid_report_without_compressor(device_run):
    import onnxruntime as ort

    _, folder, dev_path = device_run
    dev = validate_report(json.loads(dev_path.read_text()))
    assert dev["target"]["latency_measured_on"] == "target" and dev["target"]["name"] == TARGET
    assert dev["target"]["runtime"] == "onnxruntime"
    assert [m["name"] for m in dev["models"]] == ["student onnx int8", "student onnx fp16", "student onnx fp32"]  # the run's FP16 graph too
    m = _manifest(folder)
    with np.load(folder / "heldout.npz") as npz:
        x, y, tp = npz["x"], npz["y"], npz["teacher_pred"]
    assert dev["data"]["heldout"] == len(y)
    for row in dev["models"]:
        pred = ort.InferenceSession(str(folder / row["path"]), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0].argmax(1)
        assert row["accuracy"] == pytest.approx(float(np.mean(pred == y)))
        assert row["agreement"] == pytest.approx(float(np.mean(pred == tp)))
        assert row["accuracy"] == pytest.approx(m["onnx"][row["path"]]["host_accuracy_bundled_rows"])
        assert row["latency_measured_on"] == "target" and row["latency_ms"]["runs"] >= 5 and row["latency_ms"]["p50"] > 0
    assert dev["bundle"]["onnx_sha256"]["student.int8.onnx"] == sha256_file(folder / "student.int8.onnx")


def test_report_merge_folds_the_device_rows_in(device_run, cli):
    run, _, dev_path = device_run
    before = load_report(run / "report.json")
    host_rows = [r for r in before["models"] if "merged_from" not in r]
    for _ in range(2):  # merging the same device's report again replaces its rows, never duplicates them
        code, out, err = cli("report", run, "--merge", dev_path)
        assert code == 0, err
        rep = load_report(run / "report.json")
        merged = [r for r in rep["models"] if "merged_from" in r]
        assert [r["name"] for r in merged] == [f"student onnx {p} (on {TARGET})" for p in ("int8", "fp16", "fp32")]
        assert [r for r in rep["models"] if "merged_from" not in r] == host_rows
    assert all(r["latency_measured_on"] == "target" and r["merged_from"]["report"] == "report.json" for r in merged)
    assert sum(n.startswith(f"Rows marked '(on {TARGET})'") for n in rep["notes"]) == 1
    md = (run / "report.md").read_text()
    assert f"| student onnx int8 (on {TARGET}) |" in md and "run_on_device.py" in md
    assert rep["target"]["latency_measured_on"] == "host"  # the run's own rows are still the host's


def test_report_merge_refuses_reports_that_do_not_belong(device_run, cli, tmp_path):
    run, _, dev_path = device_run
    before = (run / "report.json").read_bytes()
    dev = json.loads(dev_path.read_text())
    broken = json.loads(json.dumps(dev))
    broken["models"][0]["accuracy"] = 2.0
    other = json.loads(json.dumps(dev))
    other["bundle"]["onnx_sha256"]["student.int8.onnx"] = "0" * 64
    cases = {"broken": (broken, "is invalid at models/0/accuracy"), "other": (other, "measured a different student.int8.onnx")}
    for name, (obj, msg) in cases.items():
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(obj))
        code, _, err = cli("report", run, "--merge", p)
        assert code == 2 and msg in err and "Traceback" not in err, err
    code, _, err = cli("report", run, "--merge", run / "report.json")  # a host report is no device report
    assert code == 2 and "is not a device report" in err
    assert (run / "report.json").read_bytes() == before


# --- refusals ----------------------------------------------------------------------------------------
def test_bundle_needs_a_finished_quantize_stage(finished_run, tmp_path, cli):
    run = _copy_run(finished_run, tmp_path / "run", drop=lambda m: m["stages"].pop("quantize"))
    with pytest.raises(CompressError, match="needs the INT8 Q/DQ model, but stage 'quantize' has not finished") as e:
        api.bundle(run, tmp_path / "b")
    assert e.value.exit_code == 2 and "compress quantize" in e.value.hint
    code, _, err = cli("bundle", run, "--out", tmp_path / "b")
    assert code == 2 and "stage 'quantize' has not finished" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_bundle_for_a_target_without_tensorrt_is_refused(finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path / "run", target=lambda m: m["config"].update(target="cpu"))
    with pytest.raises(CompressError, match="runs onnxruntime, not TensorRT"):
        api.bundle(run)


def test_bundle_cli_refuses_to_overwrite_without_force(finished_run, tmp_path, cli):
    out = tmp_path / "b"
    code, stdout, err = cli("bundle", finished_run, "--out", out)
    assert code == 0, err
    assert f"tarball: {out}.tar.gz" in stdout and (out / "manifest.json").is_file()
    code, _, err = cli("bundle", finished_run, "--out", out)
    assert code == 2 and "already exists" in err and "--force" in err
    readme = (out / "README.md").read_text()
    (out / "README.md").write_text("edited")  # one of the bundle's own files: --force replaces it
    code, _, err = cli("bundle", finished_run, "--out", out, "--force")
    assert code == 0, err
    assert (out / "README.md").read_text() == readme  # replaced, not written over
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial or old folder left
    (out / "stale.txt").write_text("from before")  # not the bundle's: --force leaves it, and the folder, alone
    code, _, err = cli("bundle", finished_run, "--out", out, "--force")
    assert code == 2 and "did not ship (stale.txt)" in err and (out / "stale.txt").read_text() == "from before"


def test_device_script_without_tensorrt_says_what_to_do(bundle10, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(bundle10, folder)
    proc = _run_device_script(folder, *DEVICE_FLAGS, cwd=tmp_path)  # the default runtime is TensorRT, absent here
    assert proc.returncode == 2, proc.stderr
    assert "error: TensorRT is not installed" in proc.stderr and "--runtime onnxruntime" in proc.stderr
    assert "Traceback" not in proc.stderr and not (folder / "report.json").exists()



# --- text from files never becomes code (issue 17) ------------------------------------------------------
def _evil(marker: Path) -> str:
    """A string that runs `touch` if it ever reaches a shell or Python unquoted: substitutions, separators, quotes,
    a newline that ends a comment, control characters, non-ASCII."""
    return (f"Orin $(touch {marker}) `touch {marker}`; touch {marker} && touch pwned || touch pwned ' \" \\ "
            f"\n touch {marker} #\r\n touch pwned # \t\x1b[31m\u2028 é 日本 ${{IFS}} %s {{0}} \"\"\" + __import__('os').system('touch pwned') + '")


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a TOML basic string (\n, \", \\, \u00XX escapes)


def _argv_stub(tmp: Path) -> tuple[Path, Path]:
    """A stand-in trtexec, found on PATH, that records its exact argv (one JSON list a line) and writes --saveEngine."""
    bin_dir, log = tmp / "bin", tmp / "argv.jsonl"
    bin_dir.mkdir()
    stub = bin_dir / "trtexec"
    stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "with open(os.environ['TRTEXEC_ARGV'], 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
                    "for a in sys.argv[1:]:\n    if a.startswith('--saveEngine='):\n        open(a.split('=', 1)[1], 'w').write('engine')\n")
    stub.chmod(0o755)
    return bin_dir, log


def _run_on_path(script: Path, tmp: Path) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    bin_dir, log = _argv_stub(tmp)
    env = {k: v for k, v in os.environ.items() if k not in ("TRTEXEC", "MAX_BATCH")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", TRTEXEC_ARGV=str(log))
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp)
    return proc, [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _nothing_ran(marker: Path, *folders: Path) -> None:
    assert not marker.exists()
    for folder in folders:
        assert not [p for p in folder.rglob("*") if p.name in ("pwned", marker.name)], folder


def test_profile_strings_never_become_shell_or_python_code(finished_run, tmp_path):
    marker = tmp_path / "MARKER"
    evil = _evil(marker)
    src = (ROOT / "targets" / f"{TARGET}.toml").read_text()
    lines = []
    for line in src.splitlines():
        key = line.split("=", 1)[0].strip()
        if key in ("description", "platform", "source") and line.startswith(key):
            line = f"{key} = {_toml_str(evil)}"
        elif key == "name" and line.startswith("name") and TARGET in line:
            line = 'name = "evil-profile"'
        elif key == "aliases":
            line = f"aliases = []\nnotes = [{_toml_str(evil)}]"
        lines.append(line)
    profile = tmp_path / "evil.toml"
    profile.write_text("\n".join(lines) + "\n", encoding="utf-8")
    from compressor.targets import load_profile

    loaded = load_profile(profile)
    assert loaded["description"] == loaded["runtime"]["platform"] == loaded["runtime"]["source"] == evil
    run = _copy_run(finished_run, tmp_path / "run", target=lambda m: m["config"].update(target=str(profile)))
    folder = Path(api.bundle(run)["dir"])
    m = validate_manifest(_manifest(folder))
    assert m["target"]["description"] == m["target"]["platform"] == evil  # the manifest keeps the text, as data

    script = (folder / "build_engine.sh").read_text()
    code = [ln for ln in script.splitlines() if ln.strip() and not ln.startswith("#")]
    assert code[:3] == ["set -euo pipefail", 'cd "$(dirname "$0")"', code[2]] and code[2].startswith("sha256sum -c")  # checksums first
    assert all(ln.startswith("#") for ln in script.splitlines() if "touch" in ln)  # the text stays inside one comment line
    readme = (folder / "README.md").read_text()
    assert [i for i, ln in enumerate(readme.splitlines()) if "touch" in ln] == [0]  # one heading line, no extra (code) lines

    proc, calls = _run_on_path(folder / "build_engine.sh", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert calls == [[f"--onnx={e['onnx']}", f"--saveEngine={e['engine']}", *e["trtexec_flags"], f"--minShapes=input:1x{LENGTH}",
                      f"--optShapes=input:1x{LENGTH}", f"--maxShapes=input:32x{LENGTH}"] for e in m["engines"]]
    _nothing_ran(marker, tmp_path)

    proc = _run_device_script(folder, "--runtime", "onnxruntime", *DEVICE_FLAGS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    dev = validate_report(json.loads((folder / "report.json").read_text()))
    assert dev["target"]["description"] == evil and dev["target"]["name"] == "evil-profile"
    proc = subprocess.run([sys.executable, str(folder / "run_on_device.py"), *DEVICE_FLAGS], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # TensorRT (absent here): past the checksums to a clear refusal
    assert proc.returncode == 2 and "error: TensorRT is not installed" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    _nothing_ran(marker, tmp_path)


def test_build_engine_script_quotes_every_value(tmp_path):
    """The pure function with hostile text in every value it takes (profile and ONNX graph names), run by bash."""
    marker = tmp_path / "MARKER"
    evil = _evil(marker)
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "student.onnx").write_bytes(b"onnx")
    (folder / "SHA256SUMS").write_text(f"{sha256_file(folder / 'student.onnx')}  student.onnx\n")
    target = {"description": evil, "runtime": {"version": evil}}
    engines = [{"name": evil, "description": evil, "onnx": "student.onnx", "engine": "student.fp32.engine", "trtexec_flags": [evil, "--fp16"]}]
    (folder / "build_engine.sh").write_text(build_engine_script(target, engines, {"name": evil, "shape": ["batch", 3, evil]}))
    proc, calls = _run_on_path(folder / "build_engine.sh", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert calls == [["--onnx=student.onnx", "--saveEngine=student.fp32.engine", evil, "--fp16", f"--minShapes={evil}:1x3x{evil}",
                      f"--optShapes={evil}:1x3x{evil}", f"--maxShapes={evil}:32x3x{evil}"]]
    assert (folder / "student.fp32.engine").read_text() == "engine"
    _nothing_ran(marker, tmp_path)
    # MAX_BATCH comes from the user's shell: a number or a refusal, never code
    env = {**os.environ, "TRTEXEC": "/bin/true", "MAX_BATCH": "$(touch pwned)"}
    proc = subprocess.run(["bash", str(folder / "build_engine.sh")], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "MAX_BATCH" in proc.stderr
    _nothing_ran(marker, tmp_path)


def test_bundle_refuses_a_runtime_version_that_is_not_a_version(finished_run, tmp_path):
    src = (ROOT / "targets" / f"{TARGET}.toml").read_text()
    profile = tmp_path / "v.toml"
    profile.write_text(src.replace('version = "10.3"', 'version = "10.3; touch pwned"').replace('aliases = ["jetson", "orin-nano"]', "aliases = []"))
    run = _copy_run(finished_run, tmp_path / "run", target=lambda m: m["config"].update(target=str(profile)))
    with pytest.raises(CompressError, match=r"runtime.version '10.3; touch pwned' is not a TensorRT version") as e:
        api.bundle(run, tmp_path / "b")
    assert "MAJOR.MINOR" in e.value.hint and not (tmp_path / "b").exists()


@pytest.mark.parametrize("how", ["trt_core.py", "latency.py", "trt_core.py+manifest", "stray numpy.py"])
def test_tampered_code_in_the_bundle_never_runs(bundle10, tmp_path, how):
    folder = tmp_path / "b"
    shutil.copytree(bundle10, folder)
    marker = tmp_path / "MARKER"
    payload = f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    name = how.split("+")[0].removeprefix("stray ")
    with open(folder / name, "a") as fh:
        fh.write(payload)
    if how.endswith("+manifest"):  # the manifest edited to match: SHA256SUMS still holds the manifest's own checksum
        m = _manifest(folder)
        m["files"][name] = {"sha256": sha256_file(folder / name), "size_bytes": (folder / name).stat().st_size}
        (folder / "manifest.json").write_text(json.dumps(m, indent=2))
    proc = subprocess.run([sys.executable, str(folder / "run_on_device.py"), "--runtime", "onnxruntime", *DEVICE_FLAGS],
                          capture_output=True, text=True, timeout=120, cwd=folder)
    assert not marker.exists(), proc.stderr
    if how.startswith("stray"):  # a file the bundle does not list cannot stand in for a module: the run goes on as usual
        assert proc.returncode == 0, proc.stderr
        return
    want = "manifest.json does not match its checksum in SHA256SUMS" if how.endswith("+manifest") else f"{name} does not match its checksum"
    assert proc.returncode == 2 and want in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (folder / "report.json").exists()
    proc, calls = _run_build_script(folder, tmp_path)
    assert proc.returncode != 0 and calls == [] and f"{'manifest.json' if how.endswith('+manifest') else name}: FAILED" in proc.stdout


def test_report_merge_refuses_a_report_without_every_onnx_checksum(device_run, cli, tmp_path):
    from compressor.bundle import merge_device_report

    run, _, dev_path = device_run
    before = (run / "report.json").read_bytes()
    dev = json.loads(dev_path.read_text())
    assert set(dev["bundle"]["onnx_sha256"]) == {"student.int8.onnx", "student.fp16.onnx", "student.onnx"}
    cases = {"empty": ({}, "names no ONNX checksums"), "missing": (None, "names no ONNX checksums"),
             "not-a-table": ("abc", "names no ONNX checksums"),
             "partial": ({"student.int8.onnx": dev["bundle"]["onnx_sha256"]["student.int8.onnx"]}, "lacks the checksum of student.fp16.onnx, student.onnx"),
             "extra": ({**dev["bundle"]["onnx_sha256"], "other.onnx": "0" * 64}, "names other.onnx, which this run has no"),
             "empty-digest": ({**dev["bundle"]["onnx_sha256"], "student.onnx": ""}, "measured a different student.onnx")}
    for name, (value, msg) in cases.items():
        obj = json.loads(json.dumps(dev))
        if value is None:
            del obj["bundle"]["onnx_sha256"]
        else:
            obj["bundle"]["onnx_sha256"] = value
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(obj))
        with pytest.raises(CompressError, match=msg):
            merge_device_report(run, p)
        code, _, err = cli("report", run, "--merge", p)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
    assert (run / "report.json").read_bytes() == before
