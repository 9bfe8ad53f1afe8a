"""compress bench --remote: the run's deploy bundle copied to another machine over SSH, run_on_device.py run there,
and its report.json brought back and merged into the run's report (rows marked '(on user@host)').

Only the system OpenSSH client is used (ssh and scp, through argv lists, never a local shell): BatchMode=yes (no
password or passphrase prompt can hang the command), a connect timeout, StrictHostKeyChecking=accept-new unless
an --ssh-option says otherwise. Every path in a remote command line is quoted with shlex.quote. The remote
temporary folder is removed at the end, whatever happened, unless keep_remote. ssh options that run a local command
or load a local library (ProxyCommand, LocalCommand, ...: LOCAL_CODE_OPTIONS) are refused as --ssh-option: set them in
~/.ssh/config, where the user, not whoever wrote a command line or a CI script, put them.

Steps, each named in its error: connect (and make the remote folder), check python (the remote Python imports
numpy and the runtime), copy the bundle, run run_on_device.py, copy report.json back, merge. A connection or
authentication failure, a missing remote Python or runtime, and bad options are input errors (exit 2); a failing
remote run is a runtime error (exit 3).
"""
from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ._io import read_regular_file, write_bytes
from .errors import CompressError

log = logging.getLogger("compressor")

CONNECT_TIMEOUT_S = 15
RUN_TIMEOUT_S = 3600
COPY_TIMEOUT_S = 600
RUNTIME_MODULES = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}
_HOST = re.compile(r"(?:[A-Za-z0-9._+-]+@)?[A-Za-z0-9._:%\[\]-]+")  # used with fullmatch: '$' would let a trailing newline through
# ssh options that run a local command or load a local library: whoever controls the option string runs code here.
# Refused on the command line (a documented decision); put them in ~/.ssh/config, where ssh applies them for that host.
LOCAL_CODE_OPTIONS = ("ProxyCommand", "LocalCommand", "PermitLocalCommand", "KnownHostsCommand", "PKCS11Provider", "SecurityKeyProvider")
_MARK = "compress-remote-dir:"  # the line that carries the remote folder's path, whatever a login script prints around it
_SSH_FAILED = 255  # what ssh itself exits with when it cannot connect or authenticate


@dataclass
class Ssh:
    """The argv prefixes for ssh and scp to one host."""
    host: str
    port: int | None = None
    identity: Path | None = None
    options: list[str] = field(default_factory=list)
    connect_timeout: int = CONNECT_TIMEOUT_S

    def _opts(self) -> list[str]:
        # ssh keeps the first value it sees for an option: the user's come first, our defaults after
        out = []
        for o in self.options:
            out += ["-o", o]
        given = {o.split("=", 1)[0].strip().lower() for o in self.options}
        for key, value in (("BatchMode", "yes"), ("ConnectTimeout", str(self.connect_timeout)),
                           ("StrictHostKeyChecking", "accept-new"), ("ServerAliveInterval", "15"), ("ServerAliveCountMax", "4")):
            if key.lower() not in given:
                out += ["-o", f"{key}={value}"]
        if self.identity is not None:
            out += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        return out

    def ssh(self, command: str) -> list[str]:
        return ["ssh", *self._opts(), *(["-p", str(self.port)] if self.port else []), "--", self.host, command]

    def scp(self, *paths: str) -> list[str]:
        return ["scp", "-q", "-r", *self._opts(), *(["-P", str(self.port)] if self.port else []), "--", *paths]

    def remote(self, path: str) -> str:
        """host:path for scp (the path is taken literally by the SFTP protocol scp uses)."""
        return f"{self.host}:{path}"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip() and not ln.startswith("Warning: Permanently added")]
    return lines[-1][:300] if lines else "no message"


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)


def check_host(host: str) -> str:
    """USER@HOST, HOST or an ssh config alias; nothing ssh could read as an option, no whitespace or control character."""
    if not host or host.startswith("-") or not _HOST.fullmatch(host):
        raise CompressError(f"--remote {host!r} is not a host (user@host, host, or an ssh config alias)", hint="e.g. --remote pi@192.168.1.20")
    return host


def check_remote_dir(remote_dir: str) -> str:
    """A folder path for the remote shell: no control character (a newline would split the remote command's output)."""
    if not remote_dir or _has_control(remote_dir):
        raise CompressError(f"--remote-dir {remote_dir!r} is not a folder path (empty, or with a control character)",
                            hint="pass a folder on the remote machine, e.g. /tmp")
    return remote_dir


def check_ssh_option(o: str) -> str:
    """One Key=value for ssh -o; options that run a local command or load a local library are refused."""
    key = o.split("=", 1)[0].strip()
    if "=" not in o or o.startswith("-") or not key.isalnum() or _has_control(o):
        raise CompressError(f"--ssh-option {o!r} is not an ssh option", hint="pass Key=value, e.g. --ssh-option StrictHostKeyChecking=no")
    if key.lower() in {k.lower() for k in LOCAL_CODE_OPTIONS}:
        raise CompressError(f"--ssh-option {key} is refused: it makes ssh run a local command or load a local library",
                            hint=f"if you need it, set it for the host in ~/.ssh/config (Host ... {key} ...), which ssh reads as usual")
    return o


def _check_args(host: str, port, identity, options, remote_dir, runtime: str) -> None:
    check_host(host)
    if port is not None and not 1 <= int(port) <= 65535:
        raise CompressError(f"--port {port} is not a TCP port", hint="pass 1..65535")
    if identity is not None and not Path(identity).is_file():
        raise CompressError(f"--identity {identity} does not exist", hint="pass the private key file ssh should use")
    for o in options:
        check_ssh_option(o)
    if remote_dir is not None:
        check_remote_dir(remote_dir)
    if runtime not in RUNTIME_MODULES:
        raise CompressError(f"--remote-runtime '{runtime}' is not one of {', '.join(RUNTIME_MODULES)}", hint="use onnxruntime (CPU) or tensorrt (GPU)")
    for tool in ("ssh", "scp"):
        if shutil.which(tool) is None:
            raise CompressError(f"'{tool}' is not installed here: compress bench --remote uses the OpenSSH client",
                                hint="install it (Debian/Ubuntu: apt-get install openssh-client)")


def _call(argv: list[str], step: str, host: str, timeout: int, *, runtime_error: bool = False) -> subprocess.CompletedProcess:
    """Run one ssh/scp command; a failure is a one-line CompressError naming the step, the host and ssh's last line."""
    log.debug("remote: %s", shlex.join(argv))
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CompressError(f"remote bench on {host}: {step} took longer than {timeout} s", hint="check the connection and the remote machine's load",
                            kind="runtime" if runtime_error else "input") from None
    if proc.returncode == 0:
        return proc
    last = _last_line(proc.stderr or proc.stdout)
    ssh_said = re.search(r"Permission denied|Connection (refused|closed|timed out|reset)|Could not resolve|No route to host|Host key verification failed", last)
    if proc.returncode == _SSH_FAILED or (argv[0] == "scp" and ssh_said):
        what = "authentication failed" if "Permission denied" in last or "Too many authentication failures" in last else "cannot connect"
        raise CompressError(f"remote bench on {host}: {step}: {what}: {last}",
                            hint="check --remote, --port, --identity and that 'ssh -o BatchMode=yes HOST true' works without a prompt")
    raise CompressError(f"remote bench on {host}: {step} failed (exit {proc.returncode}): {last}",
                        hint="run it by hand on the remote machine to see all of it (--keep-remote keeps the folder)",
                        kind="runtime" if runtime_error else "input")


def mktemp_command(remote_dir: str | None) -> str:
    """The remote shell command that makes the temporary folder and prints its absolute path (pwd -P) on a line of
    its own behind a marker, so a relative --remote-dir, or text a login script prints, cannot be mistaken for it."""
    # './' keeps a folder named '-x' from being read as an option by mkdir and mktemp
    parent_q = shlex.quote(remote_dir if not remote_dir.startswith("-") else "./" + remote_dir) if remote_dir else '"${TMPDIR:-/tmp}"'
    return (f"mkdir -p {parent_q} && d=$(mktemp -d {parent_q}/compress-bench.XXXXXXXX) && CDPATH= cd -P -- \"$d\" && "
            f"printf '%s%s\\n' {shlex.quote(_MARK)} \"$(pwd -P)\"")


def _remote_folder(stdout: str) -> str | None:
    """The absolute path of the folder the mktemp command made, from its marked line; None when there is no sound one."""
    found = [ln[len(_MARK):] for ln in (stdout or "").split("\n") if ln.startswith(_MARK)]
    if len(found) != 1:
        return None
    path = found[0]
    if not path.startswith("/") or _has_control(path) or not re.fullmatch(r"compress-bench\.[A-Za-z0-9._-]+", path.rpartition("/")[2]):
        return None
    return path


def remote_bench(run_dir: str | Path, host: str, *, remote_python: str = "python3", remote_dir: str | None = None,
                 ssh_options: list[str] | tuple[str, ...] = (), identity: str | Path | None = None, port: int | None = None,
                 runtime: str = "onnxruntime", keep_remote: bool = False, min_runs: int | None = None,
                 min_duration_s: float | None = None, warmup_ms: float | None = None,
                 connect_timeout: int = CONNECT_TIMEOUT_S) -> Path:
    """Bench the run's exported models on `host` over SSH; returns the device's report.json, copied into the run for
    the report stage to merge (api.remote_bench). The run needs its export, quantize and bench stages done (the bundle carries the host accuracies)."""
    from .bundle import make_bundle
    from .run import Run

    options = list(ssh_options)
    _check_args(host, port, identity, options, remote_dir, runtime)
    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)
    ssh = Ssh(host, int(port) if port else None, Path(identity) if identity else None, options, connect_timeout)
    py = shlex.quote(remote_python)
    with tempfile.TemporaryDirectory(prefix="compress-remote-") as local:
        local = Path(local)
        info = make_bundle(run, local / f"bundle-{run.target['name']}", any_target=True)
        folder = Path(info["dir"])
        # connect: make the remote folder (mktemp -d), which also proves the login works
        parent = remote_dir or "${TMPDIR:-/tmp}"
        out = _call(ssh.ssh(mktemp_command(remote_dir)), f"connect and make a folder under {parent}", host, connect_timeout + 60).stdout
        rtmp = _remote_folder(out)
        if rtmp is None:
            raise CompressError(f"remote bench on {host}: connect: mktemp printed no folder path ({_last_line(out)})",
                                hint="the remote needs a POSIX shell and mktemp")
        log.info("remote: %s:%s", host, rtmp)
        try:
            module = RUNTIME_MODULES[runtime]
            probe = f"{py} -c " + shlex.quote(f"import numpy, {module}; print({module}.__version__)")
            try:
                version = _call(ssh.ssh(probe), f"check python ({remote_python} with numpy and {module})", host, connect_timeout + 120).stdout.strip()
            except CompressError as exc:
                raise CompressError(exc.message, hint=f"install numpy and {module} for {remote_python} on {host} (pip install numpy {module}), "
                                                      "or pass --remote-python /path/to/a/python that has them") from None
            log.info("remote: %s has %s %s", remote_python, module, version.splitlines()[-1] if version else "?")
            _call(ssh.scp(str(folder), ssh.remote(rtmp + "/")), "copy the bundle", host, COPY_TIMEOUT_S)
            rbundle = f"{rtmp}/{folder.name}"
            rreport = f"{rtmp}/report.json"
            flags = [f"--runtime={runtime}", f"--out={rreport}"]
            for flag, value in (("--min-runs", min_runs), ("--min-duration", min_duration_s), ("--warmup-ms", warmup_ms)):
                if value is not None:
                    flags.append(f"{flag}={value}")
            cmd = f"cd {shlex.quote(rbundle)} && {py} run_on_device.py " + " ".join(shlex.quote(f) for f in flags)
            log.info("remote: running run_on_device.py --runtime %s on %s", runtime, host)
            _call(ssh.ssh(cmd), "run_on_device.py", host, RUN_TIMEOUT_S, runtime_error=True)
            back = local / "report.json"
            _call(ssh.scp(ssh.remote(rreport), str(back)), "copy report.json back", host, COPY_TIMEOUT_S)
        finally:
            if keep_remote:
                log.info("remote: kept %s:%s (--keep-remote)", host, rtmp)
            else:
                try:
                    _call(ssh.ssh(f"rm -rf -- {shlex.quote(rtmp)}"), "remove the remote folder", host, connect_timeout + 60)
                except CompressError as exc:
                    log.warning("remote: could not remove %s:%s: %s", host, rtmp, exc.message)
        # the merged report lives in the run: the copied report.json is renamed so merged_from names where it came from
        kept = run.path(f"remote-report-{re.sub(r'[^A-Za-z0-9._-]', '_', host)}.json")
        from .bench.report import REPORT_MAX_BYTES

        write_bytes(kept, read_regular_file(back, "the remote's report.json", REPORT_MAX_BYTES))
    return kept
