"""Integer token-id data and transformer students end to end: token ids through distill → export → quantize → bench
on the CLI (ONNX matches PyTorch, int64 input, embeddings quantized), the every-other-block student cut from the
teacher (half the blocks, the teacher's weights in them, rebuilt by later stages), the refusals (TorchScript/ONNX
teacher for that spec, negative ids, mixed dtypes), and the synthetic sequence benchmark case."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from compressor.config import DataConfig
from compressor.data import load_data
from compressor.errors import CompressError
from compressor.models import build_student, load_student, load_teacher
from compressor.models.student import find_block_stack

ROOT = Path(__file__).resolve().parent.parent
VOCAB, LENGTH, CLASSES, LAYERS = 16, 12, 3, 4

ARCH_SRC = f'''
import torch
import torch.nn as nn


class TinyTokenNet(nn.Module):
    def __init__(self, vocab={VOCAB}, length={LENGTH}, classes={CLASSES}, d=16, layers={LAYERS}):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, length, d))
        layer = nn.TransformerEncoderLayer(d, 2, 2 * d, 0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x) + self.pos[:, : x.shape[1]]).mean(1))


def build():
    return TinyTokenNet()


def student(num_classes, input_shape):
    return TinyTokenNet(classes=num_classes, length=input_shape[0], d=8, layers=1)
'''


def _rows(n, rng):
    x = rng.integers(0, VOCAB, (n, LENGTH)).astype(np.int64)
    return x, (x[:, 0] % CLASSES).astype(np.int64)  # learnable in a few steps: this test is about plumbing


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A tiny transformer teacher (state dict + arch, and TorchScript/ONNX copies) and token-id data."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    x, y = _rows(400, rng)
    x_test, y_test = _rows(150, rng)
    y_pool = y.copy()
    y_pool[250:] = -1
    npz = d / "tokens.npz"
    np.savez(npz, x=x, y=y_pool, x_test=x_test, y_test=y_test)
    arch = d / "arch.py"
    arch.write_text(ARCH_SRC)
    ns: dict = {}
    exec(compile(ARCH_SRC, str(arch), "exec"), ns)
    torch.manual_seed(0)
    m = ns["build"]()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x[:250]), torch.from_numpy(y[:250])
    for _ in range(60):
        loss = nn.functional.cross_entropy(m(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    sd = d / "teacher_state.pt"
    torch.save(m.state_dict(), sd)
    ts = d / "teacher.ts.pt"
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(m, (torch.from_numpy(x[:2]),), check_trace=False), str(ts))
    onnx_path = d / "teacher.onnx"
    torch.onnx.export(m, (torch.from_numpy(x[:2]),), str(onnx_path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return dict(dir=d, npz=npz, arch=f"{arch}:build", student=f"{arch}:student", state_dict=sd, torchscript=ts, onnx=onnx_path,
                module=m, x=x, x_test=x_test, y_test=y_test)


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


# --- token ids end to end ---------------------------------------------------------------------------------
def test_token_ids_distill_export_quantize_bench(cli, tok, tmp_path):
    import onnx
    import onnxruntime as ort

    from compressor.run import Run

    run = tmp_path / "run"
    code, _, err = cli("-q", "distill", "--teacher", tok["state_dict"], "--teacher-arch", tok["arch"], "--data", tok["npz"],
                       "--student", tok["student"], "--target", "jetson", "--steps", 100, "--no-baseline", "--out", run)
    assert code == 0, err
    for stage in ("export", "quantize"):  # --trust: the student's code exports (its TorchScript copy does not: attention)
        code, _, err = cli("-q", stage, run, "--trust")
        assert code == 0, err
    code, _, err = cli("-q", "bench", run, "--min-runs", 5, "--min-duration", 0.01)
    assert code == 0, err

    m = _manifest(run)["stages"]
    # the ONNX graph takes int64 token ids named "input" with a dynamic batch axis, and matches PyTorch
    check = m["export"]["result"]["check"]
    assert check["max_abs_diff"] <= 1e-3 and check["agreement"] >= 0.999
    g = onnx.load(str(run / "student.onnx")).graph
    assert g.input[0].name == "input" and g.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert g.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    student = Run.open(run).load_trained("student")
    with torch.inference_mode():
        ref = student(torch.from_numpy(tok["x_test"])).numpy()
    got = ort.InferenceSession(str(run / "student.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": tok["x_test"]})[0]
    assert np.abs(ref - got).max() < 1e-4 and (ref.argmax(1) == got.argmax(1)).all()

    # INT8: calibrated on int64 rows; the embedding table's Gather and the MatMuls run between Q/DQ pairs
    q = m["quantize"]["result"]
    assert q["ops_int8"].get("Gather", 0) >= 1 and q["ops_int8"].get("MatMul", 0) >= 1, q
    assert q["fallback"] is None and q["agreement_with_fp32"] >= 0.8, q
    int8 = ort.InferenceSession(str(run / "student.int8.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": tok["x_test"]})[0]
    assert int8.shape == (len(tok["x_test"]), CLASSES)

    rep = json.loads((run / "report.json").read_text())
    by = {r["name"]: r for r in rep["models"]}
    assert set(by) == {"teacher", "student", "student onnx fp32", "student onnx fp16", "student onnx int8"}  # the jetson target takes fp16
    assert by["teacher"]["accuracy"] > 0.6  # the rule is learnable: the teacher really ran on the int64 rows
    assert by["student onnx fp32"]["accuracy"] == pytest.approx(by["student"]["accuracy"])
    assert by["student"]["agreement"] > 0.4 and all(r["latency_ms"]["p50"] > 0 for r in rep["models"])


# --- the every-other-block student ---------------------------------------------------------------------------
def test_every_other_student_keeps_half_the_blocks_with_the_teachers_weights(tok):
    teacher = load_teacher(tok["state_dict"], tok["arch"])
    tm = teacher.module
    student, record = build_student("teacher:every-other", (LENGTH,), CLASSES, teacher=teacher)
    kw = record["kwargs"]
    assert kw["stack"] == "encoder.layers" and kw["teacher_blocks"] == LAYERS and kw["kept"] == [0, 2]
    assert kw["counters_fixed"] == ["encoder.num_layers"] and student.encoder.num_layers == 2
    assert len(student.encoder.layers) == LAYERS // 2 and len(tm.encoder.layers) == LAYERS  # the teacher is untouched
    assert 0.3 < kw["param_ratio"] < 0.8 and kw["params"] == sum(p.numel() for p in student.parameters())
    for j, i in enumerate(kw["kept"]):
        t_sd, s_sd = tm.encoder.layers[i].state_dict(), student.encoder.layers[j].state_dict()
        assert t_sd.keys() == s_sd.keys() and all(torch.equal(t_sd[k], s_sd[k]) for k in t_sd)
    for name in ("embed.weight", "pos", "head.weight", "head.bias"):
        assert torch.equal(student.state_dict()[name], tm.state_dict()[name])
    assert student.encoder.layers[1].linear1.weight.data_ptr() != tm.encoder.layers[2].linear1.weight.data_ptr()  # a copy
    with torch.no_grad():
        assert student.eval()(torch.from_numpy(tok["x"][:5])).shape == (5, CLASSES)
    # the record rebuilds the same architecture, so a saved state dict loads strictly
    rebuilt = load_student(record, teacher=teacher)
    rebuilt.load_state_dict(student.state_dict())
    with pytest.raises(CompressError, match="cut from the teacher"):
        load_student(record)
    other = build_student(None, (LENGTH,), CLASSES, vocab_size=VOCAB)[0]  # a different architecture with a 2-block stack
    with pytest.raises(CompressError, match=f"no longer has the {LAYERS}-block stack 'encoder.layers'"):
        load_student(record, teacher=other)


def test_every_other_student_through_the_cli_stages(cli, tok, tmp_path):
    from compressor.run import Run

    run = tmp_path / "run"
    code, _, err = cli("-q", "distill", "--teacher", tok["state_dict"], "--teacher-arch", tok["arch"], "--data", tok["npz"],
                       "--student", "teacher:every-other", "--target", "jetson", "--steps", 20, "--no-baseline", "--out", run)
    assert code == 0, err
    res = _manifest(run)["stages"]["distill"]["result"]
    assert res["student_record"]["spec"] == "teacher:every-other"
    assert res["student_record"]["kwargs"]["param_ratio"] == round(res["params"] / res["teacher_params"], 4)
    code, _, err = cli("-q", "export", run)  # the student's TorchScript copy: a traced attention does not export to ONNX
    assert code == 3 and "pass --trust" in err, err
    code, _, err = cli("-q", "export", run, "--trust")  # its code does (the teacher's, which it is cut from, runs: trusted)
    assert code == 0, err
    assert len(list(Run.open(run).load_trained("student").encoder.layers.children())) == LAYERS // 2


def test_every_other_on_residual_stages_and_sequentials():
    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(x + self.bn(self.conv(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.layer1 = nn.Sequential(*[Block(4) for _ in range(5)])
            self.layer2 = nn.Sequential(Block(4), Block(4))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

        def forward(self, x):
            return self.head(self.layer2(self.layer1(self.stem(x))))

    torch.manual_seed(0)
    net = Net().eval()
    assert find_block_stack(net) == ("layer1", 5)
    student, record = build_student("teacher:every-other", (1, 8, 8), 3, teacher=net)
    assert record["kwargs"]["kept"] == [0, 2, 4] and len(student.layer1) == 3 and len(student.layer2) == 2
    for j, i in enumerate([0, 2, 4]):
        assert torch.equal(student.layer1[j].conv.weight, net.layer1[i].conv.weight)
    with torch.no_grad():
        assert student.eval()(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(CompressError, match="no stack of repeated blocks"):
        build_student("teacher:every-other", (4,), 3, teacher=nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    with pytest.raises(CompressError, match="unknown teacher-derived student"):
        build_student("teacher:every-third", (4,), 3, teacher=net)


def test_every_other_from_a_torchscript_teacher_is_a_clear_error(cli, tok, tmp_path):
    code, _, err = cli("-q", "distill", "--teacher", tok["torchscript"], "--data", tok["npz"], "--student", "teacher:every-other",
                       "--steps", 2, "--no-baseline", "--out", tmp_path / "run")
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "TorchScript" in lines[0] and "--teacher-arch" in lines[0] and "--trust" in lines[0], lines[0]
    assert not (tmp_path / "run" / "student.pt").exists()


def test_every_other_from_an_onnx_teacher_is_a_clear_error(tok):
    with pytest.raises(CompressError, match="ONNX model") as ei:
        build_student("teacher:every-other", (LENGTH,), CLASSES, teacher=load_teacher(tok["onnx"]))
    assert ei.value.exit_code == 2 and "--teacher-arch" in str(ei.value)


# --- token-id data checks -----------------------------------------------------------------------------------
def test_negative_token_ids_are_a_clear_error(cli, tok, tmp_path):
    x = tok["x"].copy()
    x[3, 2] = -1
    bad = tmp_path / "neg.npz"
    np.savez(bad, x=x, y=np.zeros(len(x), np.int64), x_test=tok["x_test"], y_test=tok["y_test"])
    code, _, err = cli("-q", "distill", "--teacher", tok["state_dict"], "--teacher-arch", tok["arch"], "--data", bad,
                       "--steps", 2, "--no-baseline", "--out", tmp_path / "run")
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "negative ids" in lines[0] and "must be >= 0" in lines[0], err


def test_token_id_dtypes(tok, tmp_path):
    p = tmp_path / "u8.npz"
    np.savez(p, x=tok["x"].astype(np.uint8), y=np.zeros(len(tok["x"]), np.int64), x_test=tok["x_test"].astype(np.int32), y_test=tok["y_test"])
    ds = load_data(DataConfig(source=str(p)))
    assert ds.token_ids and ds.x.dtype == np.int64 and ds.x_test.dtype == np.int64 and (ds.x == tok["x"]).all()
    mixed = tmp_path / "mixed.npz"
    np.savez(mixed, x=tok["x"], y=np.zeros(len(tok["x"]), np.int64), x_test=tok["x_test"].astype(np.float32), y_test=tok["y_test"])
    with pytest.raises(CompressError, match="token ids .* but 'x_test' holds float features"):
        load_data(DataConfig(source=str(mixed)))


def test_default_student_for_token_ids_is_a_small_transformer():
    student, record = build_student(None, (LENGTH,), CLASSES, teacher_params=200_000, vocab_size=VOCAB)
    assert record["spec"] == "builtin:transformer" and record["kwargs"]["vocab_size"] == VOCAB
    assert sum(p.numel() for p in student.parameters()) <= 20_000
    with torch.no_grad():
        assert student.eval()(torch.randint(0, VOCAB, (3, LENGTH))).shape == (3, CLASSES)
    assert type(load_student(record)).__name__ == type(student).__name__


# --- the synthetic sequence benchmark case -----------------------------------------------------------------
def test_seq_task_data_and_models(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks" / "distill"))
    import seq_models
    import seq_task

    d = seq_task.write_npz(tmp_path / "seq.npz", pool=400, labels=100, test=200, seed=1)
    with np.load(tmp_path / "seq.npz") as z:
        assert z["x"].dtype == np.int64 and z["x"].shape == (400, seq_task.LENGTH) and z["x_test"].shape == (200, seq_task.LENGTH)
        assert (z["y"][:100] >= 0).all() and (z["y"][100:] == -1).all() and z["x"].max() < seq_task.VOCAB
    # exactly one marker per row; the label is the residue of the token after it, up to the 5% label noise
    x = np.concatenate([d["x"], d["x_test"]])
    y = np.concatenate([d["y_true"], d["y_test"]])
    assert ((x == seq_task.MARKER).sum(1) == 1).all()
    p = (x == seq_task.MARKER).argmax(1)
    assert 0.9 < np.mean(y == x[np.arange(len(x)), p + 1] % seq_task.CLASSES) < 1.0
    teacher, tiny = seq_models.build(), seq_models.tiny()
    tp, sp = (sum(q.numel() for q in m.parameters()) for m in (teacher, tiny))
    assert len(teacher.encoder.layers) == 4 and sp < tp / 5
    with torch.no_grad():
        assert tiny.eval()(torch.from_numpy(d["x"][:3])).shape == (3, seq_task.CLASSES)
    path = tmp_path / "teacher.onnx"
    import onnxruntime as ort

    teacher.eval()
    torch.onnx.export(teacher, (torch.from_numpy(d["x"][:2]),), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    with torch.no_grad():
        ref = teacher(torch.from_numpy(d["x_test"][:7])).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": d["x_test"][:7]})[0]
    assert np.abs(ref - got).max() < 1e-4


def test_quantize_falls_back_to_core_ops_and_says_what_stays_float(tok, tmp_path, monkeypatch):
    import onnxruntime.quantization as oq

    from compressor.export.quantize import get_recipe, preprocess, qdq_summary, quantize_static

    real = oq.quantize_static

    def flaky(*args, **kw):  # a recipe that cannot quantize some op: ORT raises unless limited to the core ops
        if kw.get("op_types_to_quantize") is None:
            raise RuntimeError("Gather: unsupported (simulated)")
        return real(*args, **kw)

    monkeypatch.setattr(oq, "quantize_static", flaky)
    pre, out = tmp_path / "pre.onnx", tmp_path / "int8.onnx"
    preprocess(tok["onnx"], pre)
    info = quantize_static(pre, out, get_recipe("tensorrt"), tok["x"][:32])
    assert "Gather: unsupported (simulated)" in info["fallback"] and "rest stays float" in info["fallback"]
    ops = qdq_summary(out)
    assert ops["int8"].get("MatMul", 0) >= 1 and ops["float"].get("Gather") == 1  # the embedding lookup stayed float
    assert qdq_summary(pre)["float"].get("Gather") == 1 and not qdq_summary(pre)["int8"]
