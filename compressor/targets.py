"""Device profiles: one TOML file per device in targets/, validated against a JSON Schema."""
from __future__ import annotations

import functools
import tomllib
from pathlib import Path

from . import schemas
from .errors import CompressError, did_you_mean

_PKG = Path(__file__).parent
PROFILE_MAX_BYTES = 1 << 20  # a profile is a few kB


def _profiles_dir() -> Path:
    # In a wheel the profiles are packaged as compressor/_targets; in a source checkout they sit in targets/.
    packaged = _PKG / "_targets"
    return packaged if packaged.is_dir() else _PKG.parent / "targets"


def load_profile(path: str | Path) -> dict:
    """Read and validate one profile file."""
    from ._io import read_regular_file

    path = Path(path)
    # missing, a folder, a FIFO (would hang), /dev/zero (would fill the memory), or larger than a profile can be
    raw = read_regular_file(path, "target profile", PROFILE_MAX_BYTES)
    try:
        profile = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise CompressError(f"target profile {path} is not valid TOML: {str(exc)[:200] or type(exc).__name__}") from None
    schemas.validate(profile, "target", f"target profile {path}")
    from .export.quantize import list_recipes

    recipe = profile["quantization"]["int8_recipe"]
    if recipe not in list_recipes():
        raise CompressError(f"target profile {path}: unknown int8_recipe '{recipe}'.{did_you_mean(recipe, list_recipes())}",
                            hint=f"choose one of {', '.join(list_recipes())}")
    return profile


@functools.lru_cache(maxsize=1)
def _builtin() -> dict[str, dict]:
    return {p.stem: load_profile(p) for p in sorted(_profiles_dir().glob("*.toml"))}


def list_targets() -> list[dict]:
    """Every built-in profile, sorted by name."""
    return sorted(_builtin().values(), key=lambda p: p["name"])


def get_target(name: str) -> dict:
    """A profile by name, alias, or path to a user's own .toml file."""
    if name.endswith(".toml") or "/" in name:
        return load_profile(name)
    names = {}
    for p in _builtin().values():
        names[p["name"]] = p
        for alias in p.get("aliases", []):
            names[alias] = p
    if name in names:
        return names[name]
    raise CompressError(
        f"unknown target '{name}'.{did_you_mean(name, names)}",
        hint="run 'compress targets' to list them, or pass a path to your own .toml profile",
    )


# --- figures and their sources -------------------------------------------------------------------------
FIGURES = ("int8_dense_tops", "int8_sparse_tops", "fp16_dense_tflops", "fp16_sparse_tflops", "memory_bandwidth_gbps", "memory_gb",
           "dla_cores", "compute_capability", "power_modes", "gpu_int8_dense_tops", "gpu_fp16_dense_tflops")
NOT_PUBLISHED = "not published"


def figure(profile: dict, key: str):
    """A hardware figure's value (a number, a string, or a dict for power_modes), or None when the profile has none
    or no source publishes it. Its source is profile['hardware'][key]['source']."""
    fig = profile.get("hardware", {}).get(key)
    if not fig or fig["value"] == NOT_PUBLISHED:
        return None
    return fig["value"]


def host_mismatches(profile: dict, machine: str | None = None, flags: set[str] | None = None) -> list[str]:
    """What this host lacks of the profile's cpu_arch and requires_cpu_features, one line each (empty: it has all)."""
    import platform

    from .bench.host import cpu_info

    machine = machine if machine is not None else platform.machine()
    flags = flags if flags is not None else cpu_info()[1]
    out = []
    arch = profile.get("cpu_arch")
    aliases = {"x86_64": {"x86_64", "amd64"}, "aarch64": {"aarch64", "arm64"}}
    if arch and machine.lower() not in aliases[arch]:
        out.append(f"this host is {machine}, not {arch}: host latencies say nothing about '{profile['name']}'")
    missing = [f for f in profile.get("requires_cpu_features", []) if f not in flags]
    if missing and not out:
        out.append(f"this host's CPU lacks {', '.join(missing)}, which '{profile['name']}' requires: "
                   f"host INT8 timings and cpu-auto's choice do not stand for that target")
    return out


def profile_warnings(profile: dict, **host) -> list[str]:
    """Lines to show beside a profile: what this host lacks for it, and a TensorRT this tool cannot build engines with."""
    out = host_mismatches(profile, **host) if profile["kind"] == "cpu" and not profile.get("is_host") else []
    rt = profile["runtime"]
    if rt["name"] == "tensorrt" and rt.get("version"):
        from .runtime.trt_core import EngineError, parse_version

        try:
            major = parse_version(rt["version"])[0]
        except EngineError:
            major = None
        if major is not None and major < 10:
            out.append(f"TensorRT {rt['version']} is older than 10: 'compress bundle' and engine building refuse this profile "
                       "(export and INT8 Q/DQ quantization still work)")
    return out


# --- rendering: `compress targets` --------------------------------------------------------------------
def _runtime_text(p: dict) -> str:
    rt = p["runtime"]
    return f"{rt['name']} {rt.get('version') or rt.get('provider', '').replace('ExecutionProvider', ' EP')}".strip()


def _fig(p: dict, key: str) -> str:
    v = figure(p, key)
    return "-" if v is None else f"{v:g}" if isinstance(v, (int, float)) else str(v)


def print_table(console=None) -> None:
    """Every built-in profile as a table on the terminal (piped: 120 columns wide), with a line on the '-' cells."""
    from rich.console import Console
    from rich.table import Table

    profiles = list_targets()
    table = Table()
    # the names are what users type: never wrap or cut them, whatever the width
    table.add_column("name", no_wrap=True, min_width=max(len(p["name"]) for p in profiles))
    # aliases are typed too: one a line, never cut
    table.add_column("aliases", no_wrap=True, min_width=max((len(a) for p in profiles for a in p.get("aliases", [])), default=7))
    for h in ("kind", "runtime", "precisions", "INT8 TOPS\ndense/sparse", "GB/s", "memory GB"):
        table.add_column(h, overflow="fold")
    for p in profiles:
        table.add_row(p["name"], "\n".join(p.get("aliases", [])), p["kind"], _runtime_text(p), " ".join(p["quantization"]["precisions"]),
                      f"{_fig(p, 'int8_dense_tops')} / {_fig(p, 'int8_sparse_tops')}", _fig(p, "memory_bandwidth_gbps"), _fig(p, "memory_gb"))
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=120)  # piped: as wide as the gate's table, so rows are not cut to 80 columns
    console.print(table)
    console.print("-: no figure (not published, or no single figure for this kind of device); 'compress targets NAME --text' shows the sources.")


def profile_text(p: dict) -> str:
    """One profile, every hardware figure with its source."""
    rt, q = p["runtime"], p["quantization"]
    lines = [f"{p['name']}: {p['description']}", f"  aliases: {', '.join(p.get('aliases', [])) or '-'}", f"  kind: {p['kind']}",
             f"  runtime: {_runtime_text(p)}"]
    if rt.get("platform"):
        lines.append(f"  platform: {rt['platform']}")
    if rt.get("provider"):
        lines.append(f"  execution provider: {rt['provider']}")
    lines += [f"  runtime source: {rt['source']}", f"  onnx opset: {rt['onnx_opset']}", f"  precisions: {', '.join(q['precisions'])}",
              f"  int8 recipe: {q['int8_recipe']}"]
    if p.get("cpu_arch"):
        lines.append(f"  cpu arch: {p['cpu_arch']}")
    if p.get("requires_cpu_features"):
        lines.append(f"  requires cpu features: {', '.join(p['requires_cpu_features'])}")
    lines += _hardware_lines(p.get("hardware", {}))
    for n in p.get("notes", []):
        lines.append(f"  note: {n}")
    return "\n".join(lines)


def _hardware_lines(hw: dict) -> list[str]:
    lines = ["  hardware:"] if hw else []
    for key, fig in hw.items():
        v = fig["value"]
        shown = ", ".join(f"{k}: {w:g} W" for k, w in v.items()) if isinstance(v, dict) else f"{v:g}" if isinstance(v, (int, float)) else str(v)
        lines.append(f"    {key}: {shown}")
        if fig.get("note"):
            lines.append(f"      note: {fig['note']}")
        lines.append(f"      source: {fig['source']}")
    return lines
