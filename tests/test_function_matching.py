"""Augmentation presets, mixup/cutmix, the online teacher (function matching), the hint loss and
multi-process training (DDP over gloo on CPU)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compressor import api
from compressor.config import CompressConfig, DataConfig, DistillConfig
from compressor.distill import augment as aug
from compressor.errors import CompressError

from conftest import run_cli


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_auto_picks_the_preset_from_the_data_shape():
    assert aug.resolve("auto", (40,)) == "signal"
    assert aug.resolve("auto", (2, 40)) == "signal"
    assert aug.resolve("auto", (3, 8, 8)) == "image"
    assert aug.resolve("auto", (16,), integer_input=True) == "none"
    with pytest.raises(CompressError, match="expects rows shaped"):
        aug.resolve("image", (40,))
    with pytest.raises(CompressError, match="token ids"):
        aug.resolve("signal", (16,), integer_input=True)
    with pytest.raises(CompressError, match="Did you mean 'signal'"):
        aug.resolve("signl", (40,))


def test_signal_views_are_seeded_shifted_scaled_and_noisy():
    t = torch.linspace(0, 1, 40)
    x = torch.sin(2 * torch.pi * 2 * t[None] + torch.rand(64, 1) * 6.28)  # smooth rows: a shift keeps them alike
    a, b, c = aug.augment(x, "signal", _gen(1)), aug.augment(x, "signal", _gen(1)), aug.augment(x, "signal", _gen(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    # a view stays close to the row it came from (shift ≤ 10%, scale 0.8–1.2, 5% noise), but is not the row
    corr = torch.nn.functional.cosine_similarity(a, x, dim=1)
    assert float(corr.median()) > 0.7 and float((a - x).abs().mean()) > 0.01


def test_signal_shift_moves_a_spike_by_at_most_a_tenth():
    x = torch.zeros(200, 1, 50)
    x[:, 0, 25] = 1.0
    out = aug.augment(x, "signal", _gen(3))
    pos = out[:, 0].argmax(1)
    assert int((pos - 25).abs().max()) <= 5 and len(set(pos.tolist())) > 3


def test_image_crop_and_flip_keep_the_shape_and_flip_only_when_asked():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8).repeat(50, 1, 1, 1)
    out = aug.augment(x, "image", _gen(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    noflip = aug.augment(x, "image-noflip", _gen(0))
    # without flips every row still increases from left to right inside its (reflect-padded) crop centre
    centre = noflip[:, 0, 3:5, 3:5]
    assert bool((centre[:, :, 1] >= centre[:, :, 0]).all())


def test_mixup_blends_rows_and_cutmix_pastes_a_box():
    rng = np.random.default_rng(0)
    x = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)] * 8)
    mixed, did = aug.mix(x, 0.4, 0.0, rng)
    assert did and mixed.shape == x.shape and bool(((mixed >= 0) & (mixed <= 1)).all())
    assert not torch.equal(mixed, x)
    cut, did = aug.mix(x, 0.0, 1.0, np.random.default_rng(1))
    assert did and set(torch.unique(cut).tolist()) <= {0.0, 1.0}
    same, did = aug.mix(x, 0.0, 0.0, rng)
    assert not did and same is x


def _cfg(tiny, teacher, **distill):
    d = dict(steps=150, baseline=False, evals=3, device="cpu")
    d.update(distill)
    return CompressConfig(teacher=str(teacher), teacher_arch=tiny.arch if teacher == tiny.state_dict else None,
                          data=DataConfig(source=str(tiny.npz)), distill=DistillConfig(**d))


def test_function_matching_runs_the_teacher_online_and_resumes_identically(tiny, tmp_path):
    cfg = _cfg(tiny, tiny.torchscript, augment="auto", mixup=0.3)
    run = api.distill(cfg, tmp_path / "a")
    res = run.stage("distill")["result"]
    assert res["teacher_online"] is True and not (tmp_path / "a" / "cache" / "teacher_pool_logits.npy").exists()
    assert res["student"]["val_accuracy"] > 1 / 3 + 0.2  # far above chance on 3 classes
    again = api.distill(cfg, tmp_path / "b")
    a = torch.load(run.path("student.pt"), weights_only=True)
    b = torch.load(again.path("student.pt"), weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), "the same seed must give the same augmented views"


def test_hint_trains_with_an_eager_teacher_and_explains_torchscript(tiny, tmp_path):
    run = api.distill(_cfg(tiny, tiny.state_dict, hint="0=2", student=tiny.student), tmp_path / "h")
    assert run.stage("distill")["result"]["student"]["val_accuracy"] > 1 / 3 + 0.2
    with pytest.raises(CompressError, match="TorchScript"):
        api.distill(_cfg(tiny, tiny.torchscript, hint="0=2", student=tiny.student), tmp_path / "t")
    with pytest.raises(CompressError, match="no layer named 'nope'"):
        api.distill(_cfg(tiny, tiny.state_dict, hint="nope=2", student=tiny.student), tmp_path / "n")
    with pytest.raises(CompressError, match="STUDENT_LAYER=TEACHER_LAYER"):
        api.distill(_cfg(tiny, tiny.state_dict, hint="0", student=tiny.student), tmp_path / "p")


def test_hint_loss_pulls_student_features_towards_the_teacher(tiny):
    from compressor.distill.losses.hint import Hint
    from compressor.models import load_teacher

    teacher = load_teacher(tiny.state_dict, tiny.arch)
    student = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x = torch.from_numpy(tiny.x[:128])
    h = Hint("0=2", student, teacher, x[:2])
    opt = torch.optim.Adam(list(student.parameters()) + list(h.parameters()), lr=1e-2)
    losses = []
    for _ in range(100):
        with torch.no_grad():
            teacher.module(x)
        student(x)
        loss = h.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_two_process_ddp_matches_one_process(tiny, tmp_path):
    common = ["distill", "--teacher", tiny.torchscript, "--data", tiny.npz, "--steps", "60", "--no-baseline", "--device", "cpu"]
    one = run_cli(*common, "--out", tmp_path / "one", timeout=300)
    assert one.returncode == 0, one.stderr
    two = run_cli(*common, "--out", tmp_path / "two", "--nproc-per-node", "2", timeout=300)
    assert two.returncode == 0, two.stderr
    a = torch.load(tmp_path / "one" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "student.pt", weights_only=True)
    for k in a:  # the same global batches and averaged gradients: equal up to floating-point order
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=2e-3, rtol=1e-3, err_msg=k)
    m = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert m["stages"]["distill"]["status"] == "done"
    assert not list((tmp_path / "two").rglob("*.tmp"))


def test_a_failing_ddp_worker_gives_one_line(tiny, tmp_path):
    r = run_cli("distill", "--teacher", tiny.torchscript, "--data", tiny.npz, "--steps", "20", "--no-baseline",
                "--device", "cpu", "--student", f"{tiny.student_file}:boom", "--out", tmp_path / "x", "--nproc-per-node", "2")
    assert r.returncode == 2, r.stderr
    assert "factory exploded" in r.stderr.splitlines()[-1] or "factory exploded" in r.stderr
    assert "Traceback" not in r.stderr


def test_resume_with_dropout_and_augmentation_matches_an_uninterrupted_run(tiny, tmp_path):
    """The checkpoint carries the RNG state: a student with dropout, trained on augmented views, resumed at
    step k ends with exactly the weights of a run that was never stopped."""
    from compressor.distill.trainer import OnlineTeacher, train_student
    from compressor.models import load_teacher

    teacher = load_teacher(tiny.torchscript)
    cfg = DistillConfig(steps=60, evals=6, device="cpu", augment="signal", mixup=0.2)

    def student():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 3))

    x, y, xv, yv = tiny.x[:300], tiny.y[:300], tiny.x[300:360], np.maximum(tiny.y[300:360], 0)
    full, _ = train_student(student(), x, y, None, xv, yv, cfg, steps=60, checkpoint=tmp_path / "a.ckpt", label="a",
                            online_teacher=OnlineTeacher(teacher, "cpu"))

    def stop_at_30(step, acc):
        if step == 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_student(student(), x, y, None, xv, yv, cfg, steps=60, checkpoint=tmp_path / "b.ckpt", label="b",
                      online_teacher=OnlineTeacher(teacher, "cpu"), on_eval=stop_at_30)
    torch.manual_seed(123)  # a different process would start from another RNG state
    resumed, res = train_student(student(), x, y, None, xv, yv, cfg, steps=60, checkpoint=tmp_path / "b.ckpt", label="b",
                                 online_teacher=OnlineTeacher(teacher, "cpu"), resume=True)
    assert res.resumed_from == 30
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_teacher_pass_is_cached_across_losses(tiny, tmp_path):
    """The pool's teacher outputs depend on teacher and data only: a rerun with another loss does not pay for them."""
    out = tmp_path / "run"
    first = api.distill(_cfg(tiny, tiny.torchscript, loss="kd", steps=20), out)
    assert first.stage("distill")["result"]["teacher_pass"] == "computed"
    again = api.distill(_cfg(tiny, tiny.torchscript, loss="dist", steps=20), out)
    res = again.stage("distill")["result"]
    assert res["student"]["loss"] == "dist" and res["teacher_pass"] == "cached"
