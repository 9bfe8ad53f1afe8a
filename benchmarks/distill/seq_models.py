"""Sequence-classification models over integer token ids (N, L), for the synthetic task in seq_task.py.

Usable straight from the command line:
    --teacher-arch benchmarks/distill/seq_models.py:build     (the teacher a state dict from seq_task.py fits)
    --student benchmarks/distill/seq_models.py:tiny           (a tiny 2-layer, d_model 32 transformer student)
    --student teacher:every-other                             (the teacher with blocks 0, 2, ... kept)
Both export to ONNX with torch.onnx.export(dynamo=False, opset 17) and a dynamic batch axis.
"""
from __future__ import annotations

import torch
import torch.nn as nn

VOCAB, LENGTH, CLASSES = 32, 32, 8


class SeqTransformer(nn.Module):
    """Token embedding + learned positional embedding + a pre-norm nn.TransformerEncoder + mean pool + linear head."""

    def __init__(self, vocab: int = VOCAB, length: int = LENGTH, num_classes: int = CLASSES, d_model: int = 64,
                 layers: int = 4, heads: int = 4, ff: int = 128, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(1, length, d_model))  # the token embedding's scale, N(0, 1): position must not be drowned out
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x):
        h = self.embed(x) + self.pos[:, : x.shape[1]]
        h = self.encoder(h)
        return self.head(self.norm(h.mean(1)))


def build(vocab: int = VOCAB, length: int = LENGTH, num_classes: int = CLASSES, layers: int = 4, d_model: int = 64):
    """The teacher: 4 layers, d_model 64, 4 heads, feed-forward 128 (about 140k parameters)."""
    return SeqTransformer(vocab, length, num_classes, d_model=d_model, layers=layers, heads=4, ff=2 * d_model)


def tiny(num_classes: int = CLASSES, input_shape: tuple = (LENGTH,), vocab: int = VOCAB):
    """A tiny student: 2 layers, d_model 32, 2 heads, feed-forward 64 (a tenth-ish of the teacher's parameters)."""
    return SeqTransformer(vocab, int(input_shape[0]), num_classes, d_model=32, layers=2, heads=2, ff=64)
