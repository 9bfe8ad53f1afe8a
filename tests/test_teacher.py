"""Teachers: the format comes from the content, every format gives the same logits, and every bad
input is a CompressError with a message that says what to do."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from compressor.errors import CompressError
from compressor.models import load_teacher


def _reference(tiny, rows=64):
    with torch.no_grad():
        return tiny.module()(torch.from_numpy(tiny.x_test[:rows])).numpy()


@pytest.mark.parametrize("attr,fmt,kw", [
    ("torchscript", "torchscript", {}),
    ("exported", "torch.export", {}),
    ("onnx", "onnx", {}),
    ("state_dict", "state_dict", "arch"),
    ("pickled", "pickle", {"trust": True}),
])
def test_every_format_loads_and_matches_the_torch_module(tiny, attr, fmt, kw):
    kwargs = {"arch": tiny.arch} if kw == "arch" else kw
    t = load_teacher(getattr(tiny, attr), **kwargs)
    assert t.format == fmt
    assert t.white_box == (fmt != "onnx")
    out = t.logits(tiny.x_test[:64], batch_size=16)  # several batches, including a ragged last one
    assert out.shape == (64, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, _reference(tiny), atol=1e-4, rtol=1e-4)
    assert t.num_params() == sum(p.numel() for p in tiny.module().parameters())


@pytest.mark.parametrize("attr,name,fmt", [
    ("torchscript", "model.onnx", "torchscript"),
    ("onnx", "model.pt", "onnx"),
    ("exported", "model.bin", "torch.export"),
    ("torchscript", "model", "torchscript"),
])
def test_format_is_detected_from_content_not_extension(tiny, tmp_path, attr, name, fmt):
    p = tmp_path / name
    shutil.copy(getattr(tiny, attr), p)
    t = load_teacher(p)
    assert t.format == fmt
    np.testing.assert_allclose(t.logits(tiny.x_test[:8]), _reference(tiny, 8), atol=1e-4, rtol=1e-4)


def test_state_dict_without_arch_asks_for_teacher_arch(tiny):
    with pytest.raises(CompressError, match="--teacher-arch"):
        load_teacher(tiny.state_dict)


def test_state_dict_with_wrong_arch_is_a_clear_error(tiny, tmp_path):
    f = tmp_path / "wrong.py"
    f.write_text("import torch.nn as nn\ndef build():\n    return nn.Linear(3, 3)\n")
    with pytest.raises(CompressError, match="does not fit"):
        load_teacher(tiny.state_dict, arch=f"{f}:build")


def test_pickled_module_needs_trust(tiny):
    with pytest.raises(CompressError, match="--trust") as ei:
        load_teacher(tiny.pickled)
    assert ei.value.exit_code == 2
    t = load_teacher(tiny.pickled, trust=True)
    assert t.format == "pickle"


@pytest.mark.parametrize("make", ["missing", "empty", "random", "folder", "text"])
def test_unreadable_teacher_files_are_compress_errors(tmp_path, make):
    p = tmp_path / "teacher.pt"
    if make == "empty":
        p.write_bytes(b"")
    elif make == "random":
        p.write_bytes(np.random.default_rng(1).bytes(4096))
    elif make == "folder":
        p.mkdir()
    elif make == "text":
        p.write_text("this is not a model\n" * 20)
    with pytest.raises(CompressError):
        load_teacher(p)


@pytest.mark.parametrize("attr", ["torchscript", "exported", "onnx", "state_dict", "pickled"])
@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_teacher_is_a_compress_error(tiny, tmp_path, attr, fraction):
    data = getattr(tiny, attr).read_bytes()
    p = tmp_path / "cut.pt"
    p.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CompressError):
        load_teacher(p, arch=tiny.arch, trust=True)


def test_zip_that_is_not_a_model_is_refused(tmp_path):
    import zipfile

    p = tmp_path / "stuff.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(CompressError, match="not a model file"):
        load_teacher(p)


def test_data_file_given_as_teacher_is_refused(tiny):
    with pytest.raises(CompressError):
        load_teacher(tiny.npz)


def test_tensor_or_dict_that_is_not_a_state_dict_is_refused(tmp_path):
    p = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), p)
    with pytest.raises(CompressError, match="not a model or a state dict"):
        load_teacher(p)
    q = tmp_path / "empty_dict.pt"
    torch.save({}, q)
    with pytest.raises(CompressError):
        load_teacher(q, arch="x.py:build")


ARCH_CASES = {
    "raises": "def build():\n    raise ValueError('no architecture today')\n",
    "not_module": "def build():\n    return {'a': 1}\n",
    "import_error": "import definitely_not_a_module_xyz\ndef build():\n    pass\n",
    "not_callable": "build = 3\n",
}


@pytest.mark.parametrize("case", sorted(ARCH_CASES))
def test_bad_arch_factory_is_a_compress_error(tiny, tmp_path, case):
    f = tmp_path / f"arch_{case}.py"
    f.write_text(ARCH_CASES[case])
    with pytest.raises(CompressError, match="--teacher-arch"):
        load_teacher(tiny.state_dict, arch=f"{f}:build")


@pytest.mark.parametrize("spec", ["no_colon_here", "/nonexistent/arch.py:build", "not_a_real_pkg_xyz.mod:build"])
def test_bad_arch_spec_is_a_compress_error(tiny, spec):
    with pytest.raises(CompressError, match="--teacher-arch"):
        load_teacher(tiny.state_dict, arch=spec)


def test_teacher_that_cannot_run_on_the_data_says_so(tiny):
    t = load_teacher(tiny.torchscript)
    with pytest.raises(CompressError, match="cannot run on data of shape"):
        t.logits(np.zeros((4, 7), np.float32))


@pytest.mark.parametrize("fmt", ["torch.export", "onnx"])
def test_teacher_exported_with_a_fixed_batch_size_still_runs(tiny, tmp_path, fmt):
    m = load_teacher(tiny.state_dict, arch=tiny.arch).module  # a plain nn.Module
    x2 = torch.from_numpy(tiny.x[:2])
    p = tmp_path / "static.model"
    if fmt == "torch.export":
        torch.export.save(torch.export.export(m, (x2,)), str(p))
    else:
        torch.onnx.export(m, (x2,), str(p), input_names=["input"], opset_version=17, dynamo=False)
    t = load_teacher(p)
    assert t.format == fmt and t.fixed_batch == 2
    # 5 rows: two full batches of 2 and a padded last one
    np.testing.assert_allclose(t.logits(tiny.x_test[:5]), _reference(tiny, 5), atol=1e-4, rtol=1e-4)
