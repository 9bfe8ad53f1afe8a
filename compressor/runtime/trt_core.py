"""TensorRT engines from ONNX, and a runner for them, with nothing but the standard library, numpy, tensorrt and
cuda-python (or torch) for the GPU memory and CUDA events.

This file imports nothing from compressor on purpose: the deploy bundle ships it verbatim, so an engine is built,
run and timed on the device by the very code the package uses. Errors are plain exceptions carrying a hint;
compressor turns them into CompressError.

Precision is explicit, never calibrated: INT8 comes from the graph's Q/DQ nodes. TensorRT 10.x builds weakly typed
networks, where a Q/DQ graph needs the INT8 builder flag (and FP16 is a flag too); TensorRT 11 removed those flags
and every network is strongly typed, so FP16 must already be in the graph (casts)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

PRECISIONS = ("fp32", "fp16", "int8")


class TensorRTUnavailable(RuntimeError):
    """TensorRT, a CUDA binding or a GPU is missing on this machine."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message, self.hint = message, hint


class EngineError(RuntimeError):
    """An engine cannot be planned, built, loaded or run; the message names what and the hint what to do."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message, self.hint = message, hint


# --- which flags for which TensorRT ------------------------------------------------------------------
def parse_version(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '10.3', '10.3.0.30' or '11.0.0'."""
    m = re.match(r"\s*v?(\d+)(?:\.(\d+))?", str(version))
    if not m:
        raise EngineError(f"cannot read a TensorRT version from {version!r}", "write it as MAJOR.MINOR, e.g. 10.3")
    return int(m.group(1)), int(m.group(2) or 0)


def choose_flags(trt_version: str, precision: str, graph: str | None = None) -> dict:
    """How to build an engine of `precision` from a graph whose own precision is `graph` with TensorRT `trt_version`.

    Returns {"strongly_typed": bool, "builder_flags": [BuilderFlag names], "trtexec": [trtexec flags]}."""
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r}", f"choose one of {', '.join(PRECISIONS)}")
    graph = graph or ("int8" if precision == "int8" else "fp32")
    if graph == "int8" and precision != "int8":
        raise EngineError("the graph holds Q/DQ nodes: it builds as an INT8 engine only", "build the FP32 ONNX file for an FP32 or FP16 engine")
    if precision == "int8" and graph != "int8":
        raise EngineError("an INT8 engine needs a Q/DQ graph: this tool never calibrates inside TensorRT",
                          "build the quantized ONNX file (student.int8.onnx) instead")
    major, _ = parse_version(trt_version)
    if major < 10:
        raise EngineError(f"TensorRT {trt_version} is older than 10, which this tool needs (tensor-based API)", "install TensorRT 10.3 or newer (JetPack 6.1+ on a Jetson)")
    if major >= 11:  # always strongly typed: precision lives in the graph
        if precision == "fp16" and graph != "fp16":
            raise EngineError(f"TensorRT {trt_version} has no FP16 builder flag (networks are always strongly typed) and this graph is FP32",
                              "cast the graph to FP16 first (e.g. ModelOpt AutoCast), or build FP32 / the INT8 Q/DQ graph")
        return {"strongly_typed": True, "builder_flags": [], "trtexec": ["--stronglyTyped"]}
    if graph == "fp16":  # an FP16 graph is typed already: keep its types on 10.x too
        return {"strongly_typed": True, "builder_flags": [], "trtexec": ["--stronglyTyped"]}
    flags = {"int8": ["INT8"], "fp16": ["FP16"], "fp32": []}[precision]  # a Q/DQ graph needs INT8 on a weakly typed network, nothing more
    return {"strongly_typed": False, "builder_flags": flags, "trtexec": [f"--{f.lower()}" for f in flags]}


def shapes_arg(input_name: str, shape: list, batch: tuple[int, int, int]) -> list[str]:
    """trtexec's --minShapes/--optShapes/--maxShapes for a dynamic batch axis (dimension 0)."""
    rest = [int(d) for d in shape[1:]]
    def fmt(b):
        return f"{input_name}:" + "x".join(str(d) for d in [b, *rest])
    return [f"--minShapes={fmt(batch[0])}", f"--optShapes={fmt(batch[1])}", f"--maxShapes={fmt(batch[2])}"]


# --- imports -----------------------------------------------------------------------------------------
def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable("TensorRT is not installed", "pip install tensorrt (or compressor[tensorrt]) on a machine with an NVIDIA GPU; "
                                  "on a Jetson it comes with JetPack (python3-libnvinfer)") from None
    return trt


def installed_version() -> str | None:
    """The importable TensorRT's version, or None; never raises."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return str(getattr(trt, "__version__", "") or "") or None


def describe_parser_error(err) -> str:
    """One line for an OnnxParser error: the failing node's name and operator when TensorRT says them."""
    def call(name):
        fn = getattr(err, name, None)
        try:
            return fn() if callable(fn) else None
        except Exception:
            return None
    desc = str(call("desc") or err).strip()
    name, op, index = call("node_name"), call("node_operator"), call("node")
    where = []
    if op:
        where.append(f"{op} node")
    if name:
        where.append(f"'{name}'")
    if not name and index is not None and index >= 0:
        where.append(f"#{index}")
    return f"{' '.join(where)}: {desc}" if where else desc


# --- building ----------------------------------------------------------------------------------------
def build_serialized(onnx_path: str | Path, precision: str, graph: str | None = None, *, batch: tuple[int, int, int] = (1, 1, 32),
                     workspace_bytes: int | None = None, trt=None) -> tuple[bytes, dict]:
    """Parse the ONNX file and build a serialized engine; returns (engine bytes, the plan used)."""
    trt = trt or import_tensorrt()
    plan = choose_flags(trt.__version__, precision, graph)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan["strongly_typed"] else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT {trt.__version__} cannot parse {Path(onnx_path).name}: " + ("; ".join(errors[:3]) or "no detail given"),
                          "replace the unsupported operation in the student, or try another opset")
    config = builder.create_builder_config()
    for name in plan["builder_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile, dynamic = builder.create_optimization_profile(), False
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = list(t.shape)
        if any(d < 0 for d in shape[1:]):
            raise EngineError(f"input '{t.name}' has dynamic dimensions besides the batch: {shape}", "export with a fixed shape except dimension 0")
        if shape and shape[0] < 0:
            dynamic = True
            profile.set_shape(t.name, (batch[0], *shape[1:]), (batch[1], *shape[1:]), (batch[2], *shape[1:]))
    if dynamic:
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT {trt.__version__} could not build an engine from {Path(onnx_path).name} (its log above says why)",
                          "check that this GPU supports the precision, or build the FP32 graph")
    return bytes(serialized), {**plan, "tensorrt_version": str(trt.__version__), "batch": list(batch)}


# --- the GPU side: memory, stream and CUDA events, through cuda-python or torch ----------------------------
class _CudaPython:
    name = "cuda-python (cudart)"

    def __init__(self):
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
        self.rt = cudart
        err, n = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess or not n:
            raise TensorRTUnavailable("no NVIDIA GPU", "run this on a machine with a CUDA GPU (a Jetson, or a PC with an NVIDIA card)")
        self.stream = self._call(cudart.cudaStreamCreate())
        self.stream_handle = self.stream
        props = self._call(cudart.cudaGetDeviceProperties(0))
        self.gpu = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        self.gpu = self.gpu.strip("\x00 ")

    def _call(self, result):
        err, rest = result[0], result[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            raise EngineError(f"CUDA error {err}", "check the GPU driver (nvidia-smi, or tegrastats on a Jetson)")
        return rest[0] if len(rest) == 1 else (rest or None)

    def alloc(self, nbytes: int):
        return self._call(self.rt.cudaMalloc(max(int(nbytes), 1)))

    def ptr(self, buf) -> int:
        return int(buf)

    def free(self, buf):
        self._call(self.rt.cudaFree(buf))

    def to_device(self, buf, host: np.ndarray):
        self._call(self.rt.cudaMemcpyAsync(buf, host.ctypes.data, host.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))

    def to_host(self, host: np.ndarray, buf):
        self._call(self.rt.cudaMemcpyAsync(host.ctypes.data, buf, host.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))

    def event(self):
        ev = self._call(self.rt.cudaEventCreate())
        self._call(self.rt.cudaEventRecord(ev, self.stream))
        return ev

    def elapsed_ms(self, start, end) -> float:
        ms = float(self._call(self.rt.cudaEventElapsedTime(start, end)))
        self._call(self.rt.cudaEventDestroy(start))
        self._call(self.rt.cudaEventDestroy(end))
        return ms

    def sync(self):
        self._call(self.rt.cudaStreamSynchronize(self.stream))

    def close(self):
        self._call(self.rt.cudaStreamDestroy(self.stream))


class _TorchCuda:
    name = "torch.cuda"

    def __init__(self):
        import torch

        if not torch.cuda.is_available():
            raise TensorRTUnavailable("no NVIDIA GPU", "run this on a machine with a CUDA GPU (a Jetson, or a PC with an NVIDIA card)")
        self.torch = torch
        self.stream = torch.cuda.Stream()
        self.stream_handle = self.stream.cuda_stream
        self.gpu = torch.cuda.get_device_name(0)

    def alloc(self, nbytes: int):
        return self.torch.empty(max(int(nbytes), 1), dtype=self.torch.uint8, device="cuda")

    def ptr(self, buf) -> int:
        return int(buf.data_ptr())

    def free(self, buf):
        pass  # torch's caching allocator owns the memory

    def to_device(self, buf, host: np.ndarray):
        src = self.torch.from_numpy(host.reshape(-1).view(np.uint8))
        with self.torch.cuda.stream(self.stream):
            buf[: host.nbytes].copy_(src)

    def to_host(self, host: np.ndarray, buf):
        with self.torch.cuda.stream(self.stream):
            data = buf[: host.nbytes].cpu().numpy()  # .cpu() waits for the stream's work
        host.reshape(-1).view(np.uint8)[:] = data

    def event(self):
        ev = self.torch.cuda.Event(enable_timing=True)
        ev.record(self.stream)
        return ev

    def elapsed_ms(self, start, end) -> float:
        end.synchronize()
        return float(start.elapsed_time(end))

    def sync(self):
        self.stream.synchronize()

    def close(self):
        pass


def cuda_backend():
    """cuda-python's runtime API when installed, else torch.cuda; raises TensorRTUnavailable when neither reaches a GPU."""
    try:
        return _CudaPython()
    except ImportError:
        pass
    try:
        return _TorchCuda()
    except ImportError:
        raise TensorRTUnavailable("neither cuda-python nor torch is installed, so there is no way to reach the GPU",
                                  "pip install cuda-python (or a CUDA build of torch)") from None


# --- running -----------------------------------------------------------------------------------------
class EngineRunner:
    """Deserialize an engine, run batches through it with the tensor-based API (execute_async_v3), and time each
    run's GPU work with CUDA events (gpu_times_ms; infer() itself returns only after the outputs are on the host)."""

    def __init__(self, engine: str | Path | bytes, trt=None, backend=None):
        self.source, self._trt, self._backend = engine, trt, backend
        self.gpu_times_ms: list[float] = []

    def activate(self) -> "EngineRunner":
        trt = self._trt or import_tensorrt()
        self.trt = trt
        data = self.source if isinstance(self.source, (bytes, bytearray)) else Path(self.source).read_bytes()
        self.cuda = self._backend or cuda_backend()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise EngineError(f"TensorRT {trt.__version__} cannot load this engine",
                              "engines are tied to the TensorRT version and GPU that built them: rebuild it on this device from the ONNX file")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        if len(self.inputs) != 1:
            raise EngineError(f"the engine has {len(self.inputs)} inputs; this runner feeds exactly one", "export the model with a single input")
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._buffers: dict[str, tuple[object, int]] = {}
        return self

    def _buffer(self, name: str, nbytes: int):
        buf, size = self._buffers.get(name, (None, 0))
        if size < nbytes:
            if buf is not None:
                self.cuda.free(buf)
            buf, size = self.cuda.alloc(nbytes), max(nbytes, 1)
            self._buffers[name] = (buf, size)
        return buf

    def infer(self, x: np.ndarray) -> np.ndarray:
        """The first output for batch x, on the host."""
        name = self.inputs[0]
        x = np.ascontiguousarray(x, dtype=self.dtypes[name])
        if not self.context.set_input_shape(name, tuple(x.shape)):
            raise EngineError(f"the engine does not take input shape {tuple(x.shape)}", "stay within the batch range the engine was built for")
        inp = self._buffer(name, x.nbytes)
        self.cuda.to_device(inp, x)
        self.context.set_tensor_address(name, self.cuda.ptr(inp))
        outs = {}
        for o in self.outputs:
            shape = tuple(self.context.get_tensor_shape(o))
            host = np.empty(shape, self.dtypes[o])
            buf = self._buffer(o, host.nbytes)
            self.context.set_tensor_address(o, self.cuda.ptr(buf))
            outs[o] = (host, buf)
        start = self.cuda.event()
        if not self.context.execute_async_v3(self.cuda.stream_handle):
            raise EngineError("TensorRT failed to run the engine (execute_async_v3 returned False)", "see TensorRT's log above")
        end = self.cuda.event()
        for host, buf in outs.values():
            self.cuda.to_host(host, buf)
        self.cuda.sync()
        self.gpu_times_ms.append(self.cuda.elapsed_ms(start, end))
        return outs[self.outputs[0]][0]

    def deactivate(self) -> None:
        for buf, _ in getattr(self, "_buffers", {}).values():
            self.cuda.free(buf)
        self._buffers = {}
        if getattr(self, "cuda", None) is not None and self._backend is None:
            self.cuda.close()
        self.context = self.engine = None

    def describe(self) -> dict:
        return {"tensorrt_version": str(self.trt.__version__), "gpu": getattr(self.cuda, "gpu", None), "timer": f"CUDA events ({self.cuda.name})"}


def summarize_ms(times: list[float]) -> dict:
    """p50/p90/p99/mean/std/min of a list of milliseconds (the shape of bench.latency.measure's answer)."""
    ms = np.asarray(times, dtype=np.float64)
    if ms.size == 0:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0, "std": 0.0, "min": 0.0, "runs": 0}
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()), "std": float(ms.std()), "min": float(ms.min()), "runs": int(ms.size)}
