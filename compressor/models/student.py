"""Students: a user factory ('file.py:build' / 'pkg.mod:build') or a built-in family sized to the data."""
from __future__ import annotations

import math

from ..errors import CompressError, did_you_mean
from ._spec import call_factory, load_callable
from .registry import get_student, list_students, register_student  # noqa: F401  (list_students re-exported)
from . import families  # noqa: F401  (registers builtin:mobilenet)


def _torch():
    import torch
    import torch.nn as nn

    return torch, nn


@register_student("cnn1d")
def cnn1d(input_shape: tuple, num_classes: int, width: int = 16):
    """A small 1-D conv net for signals shaped (L,) or (C, L)."""
    torch, nn = _torch()
    in_ch, length = (1, input_shape[0]) if len(input_shape) == 1 else input_shape
    out_len = math.ceil(math.ceil(length / 2) / 2)

    class CNN1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv1d(in_ch, width, 5, padding=2, stride=2), nn.ReLU(),
                nn.Conv1d(width, width, 3, padding=1, stride=2), nn.ReLU(),
                nn.Conv1d(width, width, 3, padding=1), nn.ReLU(),
            )
            self.head = nn.Linear(width * out_len, num_classes)

        def forward(self, x):
            if x.dim() == 2:
                x = x.unsqueeze(1)
            return self.head(self.features(x).flatten(1))

    return CNN1d()


@register_student("cnn2d")
def cnn2d(input_shape: tuple, num_classes: int, width: int = 16):
    """A small 2-D conv net for images shaped (C, H, W)."""
    torch, nn = _torch()
    in_ch = input_shape[0]

    def block(i, o, s):
        return [nn.Conv2d(i, o, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(
        *block(in_ch, width, 1), *block(width, 2 * width, 2), *block(2 * width, 2 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )


@register_student("mlp")
def mlp(input_shape: tuple, num_classes: int, width: int = 64):
    """A two-layer perceptron over the flattened input."""
    torch, nn = _torch()
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(), nn.Linear(width, num_classes))


@register_student("transformer")
def transformer(input_shape: tuple, num_classes: int, width: int = 32, vocab_size: int = 256, layers: int = 2):
    """A small transformer encoder for integer token ids shaped (L,): token + learned position embeddings,
    pre-norm encoder layers, mean pool over positions, linear head."""
    torch, nn = _torch()
    if len(input_shape) != 1:
        raise CompressError(f"the built-in token-id student takes rows of token ids shaped (L,), but the data's rows are {tuple(input_shape)}",
                            hint="pass --student file.py:factory for this input")
    length = int(input_shape[0])
    heads = 4 if width % 4 == 0 and width >= 64 else 2 if width % 2 == 0 else 1

    class TokenTransformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab_size, width)
            self.pos = nn.Parameter(torch.randn(1, length, width))  # same scale as the token embedding (N(0, 1))
            layer = nn.TransformerEncoderLayer(width, heads, 2 * width, 0.0, batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            h = self.encoder(self.embed(x) + self.pos[:, : x.shape[1]])
            return self.head(self.norm(h.mean(1)))

    return TokenTransformer()


_WIDTHS = (4, 6, 8, 12, 16, 20, 24, 32, 48, 64, 96, 128)


def _family(input_shape: tuple) -> str:
    return {1: "cnn1d", 2: "cnn1d", 3: "cnn2d"}.get(len(input_shape), "mlp")


def _params(m) -> int:
    return int(sum(p.numel() for p in m.parameters()))


def default_student_record(input_shape: tuple, num_classes: int, teacher_params: int | None, vocab_size: int | None = None) -> dict:
    """The built-in student for this data: the widest of its family within a tenth of the teacher's parameters.
    Token-id data (vocab_size given) gets the small transformer; float data a conv net or an MLP by its shape."""
    family = "transformer" if vocab_size else _family(input_shape)
    extra = {"vocab_size": int(vocab_size)} if vocab_size else {}
    width = 16
    if teacher_params:
        fitting = [w for w in _WIDTHS if _params(get_student(family)(input_shape, num_classes, w, **extra)) <= teacher_params / 10]
        width = fitting[-1] if fitting else _WIDTHS[0]
    return {"spec": f"builtin:{family}", "kwargs": {"input_shape": list(input_shape), "num_classes": num_classes, "width": width, **extra}}


def build_student(spec: str | None, input_shape: tuple, num_classes: int, teacher_params: int | None = None, *,
                  teacher=None, vocab_size: int | None = None):
    """Build a fresh student; returns (module, record) where record rebuilds it in later stages.

    teacher (a Teacher or an nn.Module) is needed by the 'teacher:…' specs, which are cut from it;
    vocab_size (token-id data only) sizes the built-in token student's embedding."""
    if spec is None or spec == "default":
        record = default_student_record(input_shape, num_classes, teacher_params, vocab_size)
    elif spec.startswith("teacher:"):
        module, record = from_teacher(spec, teacher)
        return module, record
    elif spec in ("auto", "teacher:pruned"):
        raise CompressError(f"--student {spec} is chosen by the distill stage (compressor.distill.auto_student), not built here")
    elif spec.startswith(("builtin:", "timm:")):
        record = {"spec": spec, "kwargs": {"input_shape": list(input_shape), "num_classes": num_classes}}
        if spec == "builtin:transformer" and vocab_size:
            record["kwargs"]["vocab_size"] = int(vocab_size)
    else:
        record = {"spec": spec, "kwargs": {}}
    return load_student(record, input_shape=input_shape, num_classes=num_classes), record


def load_student(record: dict, input_shape: tuple | None = None, num_classes: int | None = None, teacher=None):
    """Rebuild the (untrained) student module described by a record from build_student
    ('teacher:…' students are rebuilt from the same teacher, so teacher is required for them)."""
    _, nn = _torch()
    spec = record["spec"]
    if spec.startswith("teacher:"):
        return from_teacher(spec, teacher, record)[0]
    if spec.startswith("builtin:"):
        factory = get_student(spec.split(":", 1)[1])
        kw = dict(record["kwargs"])
        kw["input_shape"] = tuple(kw["input_shape"])
        module = factory(**kw)
    elif spec.startswith("timm:"):
        module = timm_student(spec.split(":", 1)[1], tuple(record["kwargs"]["input_shape"]), int(record["kwargs"]["num_classes"]))
    else:
        fn = load_callable(spec, "--student")
        module = call_factory(fn, spec, "--student", num_classes=num_classes, input_shape=input_shape)
    if not isinstance(module, nn.Module):
        raise CompressError(f"--student '{spec}' returned {type(module).__name__}, not a torch.nn.Module")
    if "output" in record:  # a student returning a tuple or dict: its class scores only (models/outputs.py)
        from .outputs import select_output

        module = select_output(module, record["output"])
    return module


def timm_student(name: str, input_shape: tuple, num_classes: int):
    """timm.create_model(name) for these images, never with downloaded weights (timm is optional: imported here only)."""
    try:
        import timm
    except ImportError as exc:
        raise CompressError(f"--student timm:{name} needs timm, which cannot be imported ({str(exc).splitlines()[0][:120]})",
                            hint="pip install timm (with a torchvision matching your torch), or use --student auto / builtin:mobilenet") from None
    if len(input_shape) != 3:
        raise CompressError(f"--student timm:{name} takes images shaped (C, H, W), but the data's rows are {tuple(input_shape)}")
    if not timm.is_model(name):
        known = timm.list_models()
        raise CompressError(f"timm has no model '{name}'.{did_you_mean(name, known)}", hint="see timm.list_models() for the names")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=int(input_shape[0]))


# --- students cut from the teacher ----------------------------------------------------------------------
TEACHER_SPECS = {
    "teacher:every-other": "the teacher with every other block of its main stack dropped (blocks 0, 2, 4, … kept with "
                           "the teacher's weights; DistilBERT's initialisation)",
    "teacher:pruned": "the teacher pruned channel by channel to --budget with Torch-Pruning's dependency graph, distilled "
                      "between pruning steps (also one of --student auto's candidates)",
}
# attributes that record a stack's length (nn.TransformerEncoder/Decoder.num_layers, common config names)
_COUNTERS = ("num_layers", "n_layers", "num_hidden_layers", "n_layer", "num_blocks", "depth")
_NOT_EAGER = {
    "torchscript": "a TorchScript module (compiled: its modules cannot be copied, cut or pruned)",
    "torch.export": "a torch.export program (a flattened graph without its module structure)",
    "onnx": "an ONNX model (run as a black box)",
    "callable": "a black-box function (only its answers are known)",
    "command": "a black-box command (only its answers are known)",
}


def eager_teacher(spec: str, teacher):
    """The teacher's eager nn.Module, or CompressError saying why this teacher cannot give the student."""
    torch, nn = _torch()
    fmt = getattr(teacher, "format", None)
    module = getattr(teacher, "module", teacher) if fmt is not None else teacher
    hint = ("pass the teacher as a state dict with --teacher-arch file.py:factory (or a whole pickled module with --trust), "
            "or choose a student with --student file.py:factory")
    does = "prunes the channels of" if spec == "teacher:pruned" else "copies blocks out of"
    if teacher is None:
        raise CompressError(f"--student {spec} is cut from the teacher, but no teacher was given", hint=hint)
    if fmt in _NOT_EAGER:
        raise CompressError(f"--student {spec} {does} an eager PyTorch teacher, but the teacher is {_NOT_EAGER[fmt]}", hint=hint)
    if isinstance(module, torch.jit.ScriptModule):
        raise CompressError(f"--student {spec} {does} an eager PyTorch teacher, but the teacher is {_NOT_EAGER['torchscript']}", hint=hint)
    if isinstance(module, torch.fx.GraphModule):
        raise CompressError(f"--student {spec} {does} an eager PyTorch teacher, but the teacher is a traced/exported graph module", hint=hint)
    if not isinstance(module, nn.Module):
        raise CompressError(f"--student {spec} needs the teacher as a torch.nn.Module, got {type(module).__name__}", hint=hint)
    return module


def find_block_stack(module) -> tuple[str, int] | None:
    """(path, length) of the module's main stack of repeated blocks: the longest nn.ModuleList / nn.Sequential with
    >= 2 children of one type that hold parameters (ties: the one with more parameters, then the outermost)."""
    _, nn = _torch()
    best, best_key = None, None
    for order, (name, m) in enumerate(module.named_modules()):
        if not isinstance(m, (nn.ModuleList, nn.Sequential)):
            continue
        kids = list(m._modules.values())
        if len(kids) < 2 or any(k is None or type(k) is not type(kids[0]) for k in kids):
            continue
        if any(_params(k) == 0 for k in kids):
            continue
        key = (len(kids), _params(m), -order)
        if best_key is None or key > best_key:
            best, best_key = (name, len(kids)), key
    return best


def cut_blocks(source, path: str, n: int, kept: list, block_type: str | None = None):
    """A deep copy of `source` whose n-block stack at `path` keeps only the blocks `kept` (the teacher's weights in them),
    with the stack-length counters it records (num_layers, …) fixed: (module, the counters fixed)."""
    import copy

    _, nn = _torch()
    student = copy.deepcopy(source).cpu()
    try:
        stack = student.get_submodule(path) if path else student
    except AttributeError:
        stack = None
    if (not isinstance(stack, (nn.ModuleList, nn.Sequential)) or len(stack) != n
            or (block_type is not None and type(stack[0]).__name__ != block_type)):
        raise CompressError(f"the teacher no longer has the {n}-block stack '{path}' this run's student was cut from",
                            hint="rerun distill with --force, or use the teacher the run was made with")
    names = list(stack._modules)
    blocks = [stack._modules[k] for k in names]
    renumber = all(k.isdigit() for k in names)
    for k in names:
        del stack._modules[k]
    for j, i in enumerate(kept):
        stack._modules[str(j) if renumber else names[i]] = blocks[i]
    fixed = []
    parent_path = path.rpartition(".")[0]
    owners = [(parent_path, student.get_submodule(parent_path) if parent_path else student), ("", student)]
    if getattr(student, "config", None) is not None:
        owners.append(("config", student.config))
    seen = set()
    for where, obj in owners:
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for attr in _COUNTERS:
            v = getattr(obj, attr, None)
            if isinstance(v, int) and not isinstance(v, bool) and v == n:
                setattr(obj, attr, len(kept))
                fixed.append(f"{where}.{attr}" if where else attr)
    for p in student.parameters():
        p.requires_grad_(True)
    student.train()
    return student, fixed


def cut_every_other(source):
    """The teacher with blocks 0, 2, 4, … of its main stack: (module, the record's kwargs that rebuild the cut)."""
    found = find_block_stack(source)
    if found is None:
        raise CompressError(f"the teacher ({type(source).__name__}) has no stack of repeated blocks (an nn.ModuleList or "
                            f"nn.Sequential of two or more children of the same type)",
                            hint="choose a student with --student file.py:factory for this architecture")
    path, n = found
    kept = list(range(0, n, 2))
    block_type = type(source.get_submodule(path)[0]).__name__ if path else type(source[0]).__name__
    student, fixed = cut_blocks(source, path, n, kept)
    return student, {"stack": path, "block_type": block_type, "teacher_blocks": n, "kept": kept, "counters_fixed": fixed}


def from_teacher(spec: str, teacher, record: dict | None = None):
    """A student cut from a deep copy of the teacher: (module, record). With a record, rebuild exactly that student."""
    if spec not in TEACHER_SPECS:
        raise CompressError(f"unknown teacher-derived student '{spec}'.{did_you_mean(spec, TEACHER_SPECS)}",
                            hint=f"choose one of {', '.join(TEACHER_SPECS)} or --student file.py:factory")
    source = eager_teacher(spec, teacher)
    tname = type(source).__name__
    if spec == "teacher:pruned":
        if record is None:
            raise CompressError("--student teacher:pruned is built by the distill stage's pruning (with --budget)")
        from .prune import apply_arch

        kw = record["kwargs"]
        depth = kw.get("depth")
        try:
            student = cut_blocks(source, depth["stack"], int(depth["teacher_blocks"]), [int(i) for i in depth["kept"]],
                                 depth.get("block_type"))[0] if depth else _copy_trainable(source)
        except CompressError as exc:
            raise CompressError(f"--student {spec}: {exc}", hint=exc.hint) from None
        return apply_arch(student, kw["arch"]).train(), record
    if record is None:
        try:
            student, kw = cut_every_other(source)
        except CompressError as exc:
            raise CompressError(f"--student {spec}: {exc}", hint=exc.hint) from None
    else:
        kw = dict(record["kwargs"])
        try:
            student, _ = cut_blocks(source, kw["stack"], int(kw["teacher_blocks"]), [int(i) for i in kw["kept"]], kw.get("block_type"))
        except CompressError as exc:
            raise CompressError(f"--student {spec}: {exc}", hint=exc.hint) from None
    t_params, s_params = _params(source), _params(student)
    new_record = {"spec": spec, "kwargs": {
        "stack": kw["stack"], "block_type": kw["block_type"], "teacher_blocks": kw["teacher_blocks"], "kept": kw["kept"],
        "counters_fixed": kw.get("counters_fixed", []),
        "teacher_class": tname, "teacher_params": t_params, "params": s_params,
        "param_ratio": round(s_params / t_params, 4) if t_params else None,
    }}
    return student, new_record


def _copy_trainable(source):
    import copy

    student = copy.deepcopy(source).cpu()
    for p in student.parameters():
        p.requires_grad_(True)
    return student
