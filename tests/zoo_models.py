"""A zoo of small students of the kinds users write (tests/test_zoo.py, benchmarks/export_zoo.py).

ZOO: name -> (factory, example input as a numpy array of 4 rows). Every model returns class scores of shape (N, 10), or
a tuple / dict whose first entry they are. EXPECTED_FAILURES: the two that no exporter turns into a graph with a
dynamic batch, with the words the tool's error must contain.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NC = 10
_rng = np.random.default_rng(0)


def img(c=1, h=28, w=28, n=4):
    return _rng.standard_normal((n, c, h, w)).astype(np.float32)


def seq(n=4, t=20, f=8):
    return _rng.standard_normal((n, t, f)).astype(np.float32)


def sig(n=4, c=1, L=64):
    return _rng.standard_normal((n, c, L)).astype(np.float32)


def tokens(n=4, t=16, vocab=100):
    return _rng.integers(0, vocab, size=(n, t)).astype(np.int64)


def conv_block(cin, cout, act=nn.ReLU):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), act(), nn.MaxPool2d(2))


# 1. AdaptiveAvgPool2d(2) on a 7x7 map (28 -> 14 -> 7 -> 7) : non-dividing 7/2
class AdaptiveAvg7to2(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(conv_block(1, 8), conv_block(8, 16),
                               nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16 * 4, NC)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.f(x)), 1))


# 2. AdaptiveMaxPool2d with non-dividing output size (7x7 -> 3x3)
class AdaptiveMax7to3(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(conv_block(1, 8), conv_block(8, 16))
        self.pool = nn.AdaptiveMaxPool2d(3)
        self.fc = nn.Linear(16 * 9, NC)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.f(x)), 1))


# 3. Global adaptive avg pool (the "safe" case, 1x1)
class GlobalAvgCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(conv_block(1, 8), conv_block(8, 16), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, NC)

    def forward(self, x):
        return self.fc(self.pool(self.f(x)).flatten(1))


# 4. depthwise separable + grouped convs
class DepthwiseGrouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.gc = nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=4)
        self.fc = nn.Linear(32, NC)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.pw(F.relu(self.dw(x))))
        x = F.relu(self.gc(x))
        return self.fc(x.mean(dim=(2, 3)))


# 5. squeeze-and-excitation
class SEBlock(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1 = conv_block(3, 16)
        self.se1 = SEBlock(16)
        self.b2 = conv_block(16, 32)
        self.se2 = SEBlock(32)
        self.fc = nn.Linear(32, NC)

    def forward(self, x):
        x = self.se2(self.b2(self.se1(self.b1(x))))
        return self.fc(x.mean((2, 3)))


# 6. MobileNetV3-ish: hardswish / hardsigmoid (SE with hardsigmoid)
class HardActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.se_r = nn.Conv2d(16, 4, 1)
        self.se_e = nn.Conv2d(4, 16, 1)
        self.pw = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, NC)

    def forward(self, x):
        x = F.hardswish(self.c1(x))
        x = F.hardswish(self.dw(x))
        s = F.hardsigmoid(self.se_e(F.relu(self.se_r(F.adaptive_avg_pool2d(x, 1)))))
        x = self.pw(x * s)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# 7. SiLU + GELU (exact and tanh) MLP/CNN
class SiLUGELUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, NC)

    def forward(self, x):
        x = F.silu(self.c1(x))
        x = F.gelu(self.c2(x))
        x = x.mean((2, 3))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# 8. LayerNorm MLP on flattened image
class LayerNormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 48)
        self.ln = nn.LayerNorm(48)
        self.fc2 = nn.Linear(48, NC)

    def forward(self, x):
        return self.fc2(F.gelu(self.ln(self.fc1(x.flatten(1)))))


# 9. GroupNorm CNN
class GroupNormCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.gn2 = nn.GroupNorm(8, 32)
        self.fc = nn.Linear(32, NC)

    def forward(self, x):
        x = F.relu(self.gn1(self.c1(x)))
        x = F.relu(self.gn2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


# 10. tiny ViT: patchify + nn.MultiheadAttention over patch tokens
class TinyViTMHA(nn.Module):
    def __init__(self, d=32, p=7):
        super().__init__()
        self.patch = nn.Conv2d(1, d, p, stride=p)  # 28/7 = 4x4 = 16 tokens
        self.pos = nn.Parameter(torch.zeros(1, 16, d))
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, NC)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1)
        h = self.ln1(t)
        a, _ = self.attn(h, h, h, need_weights=False)
        t = t + a
        t = t + self.mlp(self.ln2(t))
        return self.head(t[:, 0])


# 11. F.scaled_dot_product_attention hand-written attention
class SDPANet(nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.h = heads
        self.patch = nn.Conv2d(1, d, 7, stride=7)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, NC)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # N, 16, d
        N, L, D = t.shape
        q, k, v = self.qkv(t).reshape(N, L, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).reshape(N, L, D)
        t = t + self.proj(o)
        return self.head(t.mean(1))


# 12. F.interpolate nearest (U-Net-ish decoder feeding a classifier)
class UpsampleNearest(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(1, 8, 3, stride=2, padding=1)  # 14
        self.up = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4, NC)

    def forward(self, x):
        d = F.relu(self.down(x))
        u = F.interpolate(d, scale_factor=2, mode="nearest")  # 28
        u = F.relu(self.up(u))
        return self.fc(F.adaptive_avg_pool2d(u, 2).flatten(1))


# 13. nn.Upsample bilinear (align_corners=False) + interpolate to size
class UpsampleBilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(1, 8, 3, stride=2, padding=1)  # 14
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, NC)

    def forward(self, x):
        u = F.relu(self.c(self.up(F.relu(self.down(x)))))
        u = F.interpolate(u, size=(10, 10), mode="bilinear", align_corners=True)
        return self.fc(u.mean((2, 3)))


# 14. torch.cat + residual add (ResNet / DenseNet-ish)
class CatResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, stride=2, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.br1 = nn.Conv2d(16, 8, 1)
        self.br2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(32, NC)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.b(F.relu(self.a(x))))
        x = torch.cat([x, self.br1(x), self.br2(x)], dim=1)
        return self.fc(x.mean((2, 3)))


# 15. Conv1d on 1-D signals (1x64)
class Conv1DSignal(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv1d(1, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(16, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(), nn.AdaptiveAvgPool1d(1))
        self.fc = nn.Linear(32, NC)

    def forward(self, x):
        return self.fc(self.f(x).squeeze(-1))


# 16. Embedding + nn.TransformerEncoder on int64 token ids (seq 16, vocab 100)
class TokenTransformer(nn.Module):
    def __init__(self, vocab=100, d=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, 16, d))
        layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, NC)

    def forward(self, ids):
        h = self.enc(self.emb(ids) + self.pos)
        return self.head(h.mean(1))


# 17. GRU classifier on (N, 20, 8)
class GRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(8, 32, batch_first=True)
        self.fc = nn.Linear(32, NC)

    def forward(self, x):
        out, h = self.rnn(x)
        return self.fc(h[-1])


# 18. LSTM classifier (2 layers, bidirectional) on (N, 20, 8)
class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 24, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(48, NC)

    def forward(self, x):
        out, (h, c) = self.rnn(x)
        return self.fc(out[:, -1])


# 19. BatchNorm2d applied after a conv in forward() (not in nn.Sequential)
class BNInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, NC)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


# 20. Dropout (nn.Dropout + F.dropout with training flag + Dropout2d)
class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 16, 3, stride=2, padding=1)
        self.d2 = nn.Dropout2d(0.2)
        self.fc1 = nn.Linear(16 * 4, 32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, NC)

    def forward(self, x):
        x = self.d2(F.relu(self.c(x)))
        x = F.adaptive_avg_pool2d(x, 2).flatten(1)
        x = F.dropout(F.relu(self.fc1(x)), p=0.3, training=self.training)
        return self.fc2(self.drop(x))


# 21. returns a tuple (logits, features)
class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(conv_block(1, 8), conv_block(8, 16))
        self.fc = nn.Linear(16, NC)

    def forward(self, x):
        feat = self.f(x).mean((2, 3))
        return self.fc(feat), feat


# 22. returns a dict {"logits": ..., "aux": ...}
class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(conv_block(1, 8), conv_block(8, 16))
        self.fc = nn.Linear(16, NC)
        self.aux = nn.Linear(16, 4)

    def forward(self, x):
        feat = self.f(x).mean((2, 3))
        return {"logits": self.fc(feat), "aux": self.aux(feat)}


# 23. flatten via x.view(x.size(0), -1) (classic tutorial style; batch-size capture risk)
class ViewFlattenCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(conv_block(1, 8), conv_block(8, 8))
        self.fc = nn.Linear(8 * 7 * 7, NC)

    def forward(self, x):
        x = self.f(x)
        return self.fc(x.view(x.size(0), -1))


# 24. reshape with hard-coded python int from shape (x.shape[0] used as python int)
class ShapeIntReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 8, 3, stride=4, padding=1)  # 7x7
        self.fc = nn.Linear(8 * 49, NC)

    def forward(self, x):
        n = int(x.shape[0])
        return self.fc(self.c(x).reshape(n, 8 * 49))


ZOO = {
    "adaptive_avg_7to2": (AdaptiveAvg7to2, img()),
    "adaptive_max_7to3": (AdaptiveMax7to3, img()),
    "global_avg_cnn": (GlobalAvgCNN, img()),
    "depthwise_grouped": (DepthwiseGrouped, img(3, 32, 32)),
    "se_net": (SENet, img(3, 32, 32)),
    "hardswish_hardsigmoid": (HardActNet, img(3, 32, 32)),
    "silu_gelu": (SiLUGELUNet, img()),
    "layernorm_mlp": (LayerNormMLP, img()),
    "groupnorm_cnn": (GroupNormCNN, img()),
    "vit_mha": (TinyViTMHA, img()),
    "sdpa": (SDPANet, img()),
    "upsample_nearest": (UpsampleNearest, img()),
    "upsample_bilinear": (UpsampleBilinear, img()),
    "cat_residual": (CatResidual, img()),
    "conv1d_signal": (Conv1DSignal, sig()),
    "token_transformer": (TokenTransformer, tokens()),
    "gru": (GRUClassifier, seq()),
    "lstm_bidir": (LSTMClassifier, seq()),
    "bn_in_forward": (BNInForward, img()),
    "dropout": (DropoutNet, img()),
    "tuple_out": (TupleOut, img()),
    "dict_out": (DictOut, img()),
    "view_flatten": (ViewFlattenCNN, img()),
    "shape_int_reshape": (ShapeIntReshape, img()),
}


def build(name, seed=0):
    """Instantiate in eval mode with non-trivial BN stats."""
    torch.manual_seed(seed)
    factory, x = ZOO[name]
    m = factory()
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval(), x


def make_input(name, n, seed=1):
    """A fresh batch of n rows with the same per-row shape/dtype as the example."""
    _, x = ZOO[name]
    r = np.random.default_rng(seed)
    if x.dtype == np.int64:
        return r.integers(0, 100, size=(n,) + x.shape[1:]).astype(np.int64)
    return r.standard_normal((n,) + x.shape[1:]).astype(np.float32)


# What the tool must say for the students that cannot ship: the operation and the module, or the fixed batch.
EXPECTED_FAILURES = {
    "adaptive_max_7to3": ("adaptive_max_pool2d", "'pool' (AdaptiveMaxPool2d)"),
    "shape_int_reshape": ("batch", "x.flatten(1)"),
}
SHIPPABLE = [n for n in ZOO if n not in EXPECTED_FAILURES]
