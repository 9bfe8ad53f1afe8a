"""Feature (hint) loss, after FitNets (Romero et al., 2015): a named student layer's activations, mapped by a
learned projection, are pulled towards a named teacher layer's activations (mean squared error scaled by the
teacher activations' variance, so its weight means the same for any layer). It is added to the logit loss.

Reading a teacher's intermediate activations needs forward hooks, which only eager modules offer: a teacher
given as a state dict with --teacher-arch, or a pickled module with --trust. TorchScript modules refuse
hooks and ONNX teachers are black boxes; for them the hint is refused with that reason.
"""
from __future__ import annotations

from ...errors import CompressError, did_you_mean


def parse(spec: str) -> tuple[str, str]:
    """'student.layer=teacher.layer' -> (student layer, teacher layer)."""
    parts = spec.split("=")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise CompressError(f"--hint '{spec}' is not STUDENT_LAYER=TEACHER_LAYER", hint="e.g. --hint features.2=features.6 (names as in model.named_modules())")
    return parts[0].strip(), parts[1].strip()


def _submodule(model, name: str, who: str):
    mods = dict(model.named_modules())
    if name not in mods:
        names = [n for n in mods if n]
        raise CompressError(f"the {who} has no layer named '{name}'.{did_you_mean(name, names)}",
                            hint=f"{who} layers: {', '.join(names[:20])}{' …' if len(names) > 20 else ''}")
    return mods[name]


class Hint:
    """Hooks on both models plus the projection; call loss() after both forwards of a step."""

    def __init__(self, spec: str, student, teacher, sample):
        import torch

        s_name, t_name = parse(spec)
        if not getattr(teacher, "white_box", False):
            raise CompressError(f"--hint needs the teacher's intermediate activations, but a {teacher.format} teacher is a black box",
                                hint="give the teacher as a state dict with --teacher-arch (or drop --hint)")
        if teacher.format == "torchscript" or isinstance(teacher.module, torch.jit.ScriptModule):
            raise CompressError("--hint needs forward hooks on the teacher, which TorchScript modules do not support",
                                hint="give the teacher as a state dict with --teacher-arch (or drop --hint)")
        self.spec = spec
        self._s = _submodule(student, s_name, "student")
        self._t = _submodule(teacher.module, t_name, "teacher")
        self.feat = {}
        self._handles = [self._s.register_forward_hook(self._keep("s")), self._t.register_forward_hook(self._keep("t"))]
        with torch.no_grad():
            was = student.training
            student.eval()
            student(sample)
            student.train(was)
            teacher.module(sample.to(teacher.device))
        fs, ft = self.feat["s"], self.feat["t"]
        if fs.dim() != ft.dim() or fs.dim() not in (2, 3, 4):
            raise CompressError(f"--hint {spec}: the student layer gives {tuple(fs.shape[1:])} per row and the teacher layer "
                                f"{tuple(ft.shape[1:])}; they need the same kind (vectors, 1-D or 2-D feature maps)")
        self.target_size = tuple(ft.shape[2:])
        conv = {2: torch.nn.Linear, 3: torch.nn.Conv1d, 4: torch.nn.Conv2d}[fs.dim()]
        self.proj = conv(fs.shape[1], ft.shape[1]) if fs.dim() == 2 else conv(fs.shape[1], ft.shape[1], 1)
        self._proj_call = self.proj

    def _keep(self, key):
        def hook(module, inputs, output):
            self.feat[key] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def to(self, device):
        self.proj.to(device)
        return self

    def parameters(self):
        return self.proj.parameters()

    def state_dict(self):
        return self.proj.state_dict()

    def load_state_dict(self, sd):
        self.proj.load_state_dict(sd)

    def ddp(self, device):
        from torch.nn.parallel import DistributedDataParallel

        self._proj_call = DistributedDataParallel(self.proj, device_ids=[device] if str(device).startswith("cuda") else None)

    def loss(self):
        import torch.nn.functional as F

        fs, ft = self.feat["s"], self.feat["t"].detach().float()
        if fs.dim() > 2 and tuple(fs.shape[2:]) != self.target_size:
            pool = F.adaptive_avg_pool1d if fs.dim() == 3 else F.adaptive_avg_pool2d
            fs = pool(fs, self.target_size)
        return F.mse_loss(self._proj_call(fs.float()), ft) / (ft.var() + 1e-6)

    def remove(self):
        for h in self._handles:
            h.remove()
