"""compressor/models/prune.py: the teacher pruned to a MACs budget with Torch-Pruning (residual adds, torch.cat,
depthwise and grouped convs, nn.MultiheadAttention, a token transformer with a learned position embedding), the record
that rebuilds the pruned architecture from an unpruned copy, and fresh weights for the same architecture."""
from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import zoo_models as zoo

from compressor.errors import CompressError
from compressor.models.budget import count
from compressor.models.prune import apply_arch, arch_record, prune_to_budget, reinitialise

pytest.importorskip("torch_pruning")
torch.set_num_threads(1)


class ResCNN(nn.Module):
    """Residual blocks (x + block(x)) around a strided conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1))
        self.down = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.b2 = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128))
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.b1(x))
        x = F.relu(self.down(x))
        x = F.relu(x + self.b2(x))
        return self.fc(x.mean((2, 3)))


class CatNet(nn.Module):
    """A residual block, then branches joined by torch.cat and mixed by a conv (zoo's CatResidual, wider)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, stride=2, padding=1)
        self.a = nn.Conv2d(64, 64, 3, padding=1)
        self.b = nn.Conv2d(64, 64, 3, padding=1)
        self.br1 = nn.Conv2d(64, 64, 1)
        self.br2 = nn.Conv2d(64, 64, 3, padding=1)
        self.mix = nn.Conv2d(192, 128, 3, padding=1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.b(F.relu(self.a(x))))
        x = torch.cat([x, F.relu(self.br1(x)), F.relu(self.br2(x))], dim=1)
        return self.fc(F.relu(self.mix(x)).mean((2, 3)))


class FixedHeadAttention(nn.Module):
    """Hand-written attention over a Linear qkv split into a fixed number and width of heads (timm's style)."""

    def __init__(self, d=64, heads=4):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.patch = nn.Conv2d(1, d, 7, stride=7)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        n, length, _ = t.shape
        q, k, v = self.qkv(t).reshape(n, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, self.heads * self.head_dim)
        t = t + self.proj(o)
        t = t + self.mlp(t)
        return self.head(t.mean(1))


def _rows(name):
    return lambda n: torch.from_numpy(zoo.make_input(name, n))


# the zoo's attention models at width 64 (at 32, four heads step from 8 to 6 dimensions each: too coarse to stop near
# a quarter of the MACs)
MODELS = {
    "residual": (ResCNN, lambda n: torch.randn(n, 3, 12, 12)),
    "concat": (CatNet, lambda n: torch.randn(n, 3, 16, 16)),
    "depthwise_grouped": (lambda: zoo.build("depthwise_grouped")[0], _rows("depthwise_grouped")),
    "multihead_attention": (lambda: zoo.TinyViTMHA(d=64), _rows("vit_mha")),
    "token_transformer": (lambda: zoo.TokenTransformer(d=64), _rows("token_transformer")),
}


def _model(kind, seed=0):
    torch.manual_seed(seed)
    factory, rows = MODELS[kind]
    return factory().eval(), rows(4)


def _sgd_step(model, x):
    """What the caller's distillation does between steps, in small: a training step with a fresh optimizer."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    F.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


def _widths(model) -> dict:
    out = {}
    for name, m in model.named_modules():
        for attr in ("in_features", "out_features", "in_channels", "out_channels", "embed_dim"):
            if isinstance(getattr(m, attr, None), int):
                out[f"{name}.{attr}"] = getattr(m, attr)
    return out


def _onnx_matches(model, x, path):
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript tracer's notes on nn.MultiheadAttention's shape checks
        torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("kind", list(MODELS))
def test_prunes_to_a_quarter_of_the_macs_and_stays_a_working_model(kind, tmp_path):
    model, x = _model(kind)
    original = copy.deepcopy(model)
    macs0 = count(model, x)[1]
    with torch.no_grad():
        shape0 = model(x).shape
    calls = []

    def between(m, step):
        calls.append(step)
        _sgd_step(m, x)

    info = prune_to_budget(model, x, lambda m: count(m, x)[1] <= 0.25 * macs0, between=between)
    macs = count(model, x)[1]
    assert 0.1 * macs0 <= macs <= 0.25 * macs0, (macs, macs0)  # met, and stopped once met rather than pruning all
    assert info["macs_after"] == macs and info["macs_before"] == macs0 and info["params_after"] < info["params_before"]
    assert 1 <= info["steps"] <= 8 and calls == list(range(info["steps"]))
    assert 0 < info["ratio"] <= 0.9
    json.dumps(info)
    # the head keeps its classes; every width that changed is a multiple of 8
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert head.out_features == 10 and info["heads"] == [n for n, m in model.named_modules() if m is head]
    assert info["kept_whole"] == []
    before, after = _widths(original), _widths(model)
    changed = {k: v for k, v in after.items() if v != before[k]}
    assert changed, "nothing was pruned"
    assert all(v % 8 == 0 for v in changed.values()), changed
    # runs in train and eval mode, same output shape, and exports to ONNX that agrees
    model.train()
    assert model(x).shape == shape0
    model.eval()
    with torch.no_grad():
        assert model(x).shape == shape0
    _onnx_matches(model, x, tmp_path / f"{kind}.onnx")


@pytest.mark.parametrize("kind", ["multihead_attention", "token_transformer", "depthwise_grouped"])
def test_apply_arch_rebuilds_the_pruned_model_from_an_unpruned_copy(kind):
    model, x = _model(kind)
    original = copy.deepcopy(model)
    macs0 = count(model, x)[1]
    prune_to_budget(model, x, lambda m: count(m, x)[1] <= 0.4 * macs0, between=lambda m, s: _sgd_step(m, x))
    record = arch_record(model, original)
    assert json.loads(json.dumps(record)) == record
    rebuilt = apply_arch(copy.deepcopy(original), record)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model(x), atol=1e-6)
    if kind == "token_transformer":  # the learned position embedding is the root module's, and was pruned
        assert record["modules"][""]["params"]["pos"] == list(model.pos.shape)
        assert model.pos.shape[-1] == model.emb.embedding_dim < 64
    if kind == "multihead_attention":  # normalized_shape comes back a tuple
        assert "normalized_shape" in record["modules"]["ln1"]["tuples"] and isinstance(rebuilt.ln1.normalized_shape, tuple)
    assert all(p.requires_grad for p in rebuilt.parameters())


def test_a_tampered_arch_record_is_refused():
    model, x = _model("multihead_attention")
    original = copy.deepcopy(model)
    macs0 = count(model, x)[1]
    prune_to_budget(model, x, lambda m: count(m, x)[1] <= 0.5 * macs0)
    record = arch_record(model, original)
    bad = []
    for path, entry in (("nope.layer", {"attrs": {"out_features": 8}}),
                        ("head", {"attrs": {"in_features": "8"}}),
                        ("head", {"attrs": {"in_features": {"__class__": "os.system"}}}),
                        ("head", {"attrs": {"forward": 1}}),
                        ("head", {"attrs": {"_parameters": 1}}),
                        ("head", {"params": {"weight": [10, 10 ** 9]}}),
                        ("head", {"params": {"weight": "10,8"}}),
                        ("head", {"params": {"nope": [10, 8]}}),
                        ("head", {"code": "import os"})):
        r = copy.deepcopy(record)
        r["modules"][path] = entry
        bad.append(r)
    bad += [{"modules": []}, [], {"modules": {"head": []}}]
    for r in bad:
        with pytest.raises(CompressError):
            apply_arch(copy.deepcopy(original), r)


def test_an_impossible_budget_is_an_error_and_leaves_the_model_untouched():
    model, x = _model("residual")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    with pytest.raises(CompressError, match="could not meet the budget") as err:
        prune_to_budget(model, x, lambda m: False, between=lambda m, s: calls.append(s))
    assert err.value.hint and "\n" not in err.value.message
    assert calls == []  # found by the dry run, before any distillation
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_budget_already_met_prunes_nothing():
    model, x = _model("residual")
    info = prune_to_budget(model, x, lambda m: True)
    assert info["steps"] == 0 and info["macs_after"] == info["macs_before"]


def test_hand_written_attention_keeps_the_layers_it_cannot_prune_whole():
    """A fixed head count and width: the qkv projection is kept whole, the model's width and MLP are pruned."""
    torch.manual_seed(0)
    model, x = FixedHeadAttention().eval(), torch.randn(4, 1, 28, 28)
    macs0 = count(model, x)[1]
    info = prune_to_budget(model, x, lambda m: count(m, x)[1] <= 0.5 * macs0)
    assert info["kept_whole"] == ["qkv"] and info["heads"] == ["head"]
    assert model.qkv.out_features == 192 and model.patch.out_channels < 64 and model.mlp[0].out_features < 128
    assert model(x).shape == (4, 10)


def test_sdpa_attention_that_no_pruning_keeps_correct_is_left_whole():
    """zoo's SDPANet splits qkv by the input's width: neither width can shrink alone, so none is pruned."""
    model, x = zoo.build("sdpa")
    x = torch.from_numpy(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    macs0 = count(model, x)[1]
    with pytest.raises(CompressError, match="kept whole"):
        prune_to_budget(model, x, lambda m: count(m, x)[1] <= 0.9 * macs0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_reinitialise_draws_fresh_weights_of_the_same_shapes():
    model, x = _model("token_transformer")
    with torch.no_grad():
        model.pos.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reinitialise(model)
    after = model.state_dict()
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    for name in ("emb.weight", "pos", "enc.layers.0.self_attn.in_proj_weight", "enc.layers.1.linear1.weight", "head.weight"):
        assert not torch.equal(before[name], after[name]), name
    assert model.pos.abs().max() < 0.5  # a small normal draw, not the +1 it had
    assert model(x).shape == (4, 10)
