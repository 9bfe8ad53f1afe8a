"""Describe the machine the measurements ran on: CPU model, cores, ISA features, GPU, library versions."""
from __future__ import annotations

import os
import platform
from importlib import metadata


def cpu_info() -> tuple[str, set[str]]:
    """(model name, ISA feature flags) of this host's CPU, from /proc/cpuinfo where there is one."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and val.strip():
                    model = val.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    if not model:  # no /proc/cpuinfo (macOS, Windows); platform.processor() runs `uname -p` on some systems, so only here
        model = platform.processor() or platform.machine()
    return model, flags


def package_version(pkg: str) -> str | None:
    """The installed version of distribution `pkg`, or None when it is not installed."""
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def describe_host() -> dict:
    """A JSON-able description of this host."""
    model, flags = cpu_info()
    features = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm") if f in flags]
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:
        pass
    try:
        load = round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        load = None
    return {
        "hostname": platform.node(),
        "load_average_1m": load,
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "cpu_features": features,
        "gpu": gpu,
        "python": platform.python_version(),
        "versions": {p: package_version(p) for p in ("torch", "onnx", "onnxruntime", "numpy", "tensorrt") if package_version(p)},
    }


def has_vnni() -> bool:
    _, flags = cpu_info()
    return bool({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"} & flags)


def host_fingerprint(rep: dict) -> dict:
    """What must match for two reports' milliseconds to be comparable: CPU model and count, GPU, threads, runtimes."""
    h = rep["host"]
    threads = sorted({m.get("threads") for m in rep["models"] if m.get("threads") is not None})
    # the features too: a virtual machine may name both an AVX2-only and an AVX-512 VNNI CPU just "AMD EPYC"
    return {"cpu": h.get("cpu"), "cpu_features": sorted(h.get("cpu_features") or []), "cpu_count": h.get("cpu_count"), "gpu": h.get("gpu"), "threads": threads,
            "onnxruntime": h.get("versions", {}).get("onnxruntime"), "torch": h.get("versions", {}).get("torch")}
