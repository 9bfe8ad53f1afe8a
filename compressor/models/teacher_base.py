"""The Teacher every loader gives (compressor/models/teacher.py for model files, query_teacher.py for teachers
that can only be queried), in a module of its own so the loaders import it without importing each other."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CompressError

_ONNX_INT = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


@dataclass
class Teacher:
    """A loaded teacher: a torch module (white box) or an ONNX Runtime session (black box)."""

    path: Path
    format: str  # torchscript | torch.export | onnx | state_dict | pickle
    module: object | None = None  # torch.nn.Module-like callable
    session: object | None = None  # onnxruntime.InferenceSession for ONNX teachers
    input_shape: tuple | None = None  # declared input shape when the format records one
    device: str = "cpu"  # where a white-box teacher runs (see to())
    output: str = "logits"  # what its scores are: logits, or probs (logits() then returns their log); outputs.resolve_teacher_output
    output_record: dict | None = None  # how that was decided (detected or asked), for the run's result and report

    def to(self, device: str) -> "Teacher":
        """Run a white-box teacher on `device` (e.g. 'cuda' for the pool logits); ONNX teachers stay on ONNX Runtime."""
        if self.module is not None and device != self.device and hasattr(self.module, "to"):
            self.module = self.module.to(device)
            self.device = device
        return self

    @property
    def white_box(self) -> bool:
        return self.module is not None

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the teacher was exported with, when it only accepts that one."""
        b = self.input_shape[0] if self.input_shape else None
        return b if isinstance(b, int) and b > 0 else None

    @property
    def runtime(self) -> str:
        return "onnxruntime" if self.session is not None else "torch"

    def logits(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Teacher outputs (N, classes) as float32 for the rows of x."""
        fixed = self.fixed_batch
        if fixed:  # exported with a static batch size: run in chunks of exactly that size, padding the last
            batch_size = fixed
        outs = []
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            if fixed and len(xb) < fixed:
                pad = np.repeat(xb[-1:], fixed - len(xb), axis=0)
                outs.append(self._run(np.concatenate([xb, pad]))[: len(xb)])
            else:
                outs.append(self._run(xb))
        out = np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
        if out.ndim != 2:
            raise CompressError(f"teacher {self.path.name} returns shape {out.shape[1:]} per row; expected a vector of class scores")
        return self.as_logits(out)

    def as_logits(self, out: np.ndarray) -> np.ndarray:
        """(N, C) scores as logits: probabilities (self.output == "probs") become their log."""
        if self.output != "probs":
            return out
        from .outputs import log_probs

        return log_probs(out)

    def _run(self, xb: np.ndarray) -> np.ndarray:
        try:
            if self.session is not None:
                inp = self.session.get_inputs()[0]
                if xb.dtype.kind in "iu" and inp.type in _ONNX_INT:  # token ids in the integer type the model declares
                    xb = xb.astype(_ONNX_INT[inp.type])
                return _check_rows(np.asarray(self.session.run(None, {inp.name: xb})[0], np.float32), len(xb), self.path.name)
            import torch

            with torch.inference_mode(), torch.autocast("cuda", enabled=self.device == "cuda"):
                y = self.module(torch.from_numpy(np.ascontiguousarray(xb)).to(self.device))
            if isinstance(y, (tuple, list)) and y:
                y = y[0]
            if not isinstance(y, torch.Tensor):
                raise CompressError(f"teacher {self.path.name} returns {_describe(y)}, not a tensor of class scores",
                                    hint="the teacher must return a (batch, classes) tensor (or a tuple whose first entry is one)")
            return _check_rows(y.float().cpu().numpy(), len(xb), self.path.name)
        except CompressError:
            raise
        except Exception as exc:
            if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
                raise CompressError(f"out of GPU memory running the teacher on batches of {len(xb)} rows",
                                    hint="lower --batch-size (the teacher runs in batches of 4x it) or use --device cpu",
                                    kind="runtime") from None
            lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
            # TorchScript wraps the real error: its first line is boilerplate, the cause is on the last one
            msg = (lines[-1] if lines[0].startswith("The following operation failed") else lines[0])[:300] if lines else type(exc).__name__
            hint = "check that --data matches the teacher's expected input (shape, channels, size)"
            if xb.dtype.kind in "iu":
                hint = ("the data's x holds integers, which are read as token ids for a model that starts with an embedding; "
                        "if they are feature values (e.g. uint8 pixels), convert x to float32 in the scale the teacher expects")
            raise CompressError(f"the teacher cannot run on data of shape {tuple(xb.shape[1:])}: {msg}", hint=hint) from exc

    def num_params(self) -> int | None:
        if self.module is not None and hasattr(self.module, "parameters"):
            return int(sum(p.numel() for p in self.module.parameters()))
        if self.session is not None:
            import onnx

            m = onnx.load(str(self.path), load_external_data=False)
            return int(sum(int(np.prod(t.dims)) for t in m.graph.initializer))
        return None


def _describe(y) -> str:
    from .outputs import describe_output

    return describe_output(y)


def _check_rows(out: np.ndarray, n: int, name: str) -> np.ndarray:
    """A batch's output must have one row per input row: a scalar or a batch-less output is a CompressError."""
    if out.ndim == 0 or out.shape[0] != n:
        what = "a scalar (a 0-d tensor)" if out.ndim == 0 else f"shape {out.shape}"
        raise CompressError(f"teacher {name} returns {what} for a batch of {n} rows; expected (batch, classes) class scores",
                            hint="the teacher must return one row of class scores per input row (no reduction such as .sum() or .mean() at the end)")
    return out
