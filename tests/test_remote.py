"""compress bench --remote against a real OpenSSH server the test starts on loopback (127.0.0.1, a free port, a
throwaway ed25519 key, its own host key and authorized_keys): the bundle goes over scp, run_on_device.py runs through
ONNX Runtime in this venv's Python on the "remote" side, report.json comes back and is merged with the host named.
Then the failures: a closed port, a key the server does not know, a remote Python without onnxruntime or that does not
exist, and a remote run that fails. Skipped when the OpenSSH server or client is not installed."""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compressor import api
from compressor.bench.report import load_report, validate_report
from compressor.remote import Ssh

from conftest import N_TEST, make_finished_run

SSHD = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.access(p, os.X_OK)), None)
MISSING = [t for t in ("ssh", "scp", "ssh-keygen") if shutil.which(t) is None] + ([] if SSHD else ["sshd"])
needs_sshd = pytest.mark.skipif(bool(MISSING), reason=f"OpenSSH not installed here ({', '.join(MISSING)} missing): "
                                                      "apt-get install openssh-server openssh-client")
FAST = ["--min-runs", "5", "--min-duration", "0.01"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "compress-test", "-f", str(path)], check=True, capture_output=True)
    return path


class Server:
    def __init__(self, root: Path):
        self.root = root
        self.user = getpass.getuser()
        self.host = f"{self.user}@127.0.0.1"
        self.key = _keygen(root / "id_ed25519")
        self.other_key = _keygen(root / "other_ed25519")  # a key the server does not know
        host_key = _keygen(root / "ssh_host_ed25519_key")
        (root / "authorized_keys").write_text((root / "id_ed25519.pub").read_text())
        os.chmod(root / "authorized_keys", 0o600)
        self.port = _free_port()
        self.config = root / "sshd_config"
        self.config.write_text("\n".join([
            "ListenAddress 127.0.0.1", f"Port {self.port}", f"HostKey {host_key}", f"AuthorizedKeysFile {root / 'authorized_keys'}",
            f"PidFile {root / 'sshd.pid'}", "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "StrictModes no", "PermitRootLogin prohibit-password", "PubkeyAuthentication yes", "Subsystem sftp internal-sftp",
            "LogLevel ERROR", ""]))
        if os.geteuid() == 0:  # as root, sshd wants its privilege separation folder (the service unit usually makes it)
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.log = open(root / "sshd.log", "w")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        pytest.skip(f"sshd did not start on 127.0.0.1:{self.port}: {(root / 'sshd.log').read_text().strip()[-300:]}")

    def args(self, key: Path | None = None) -> list:
        return ["--remote", self.host, "--port", self.port, "--identity", key or self.key,
                "--ssh-option", "StrictHostKeyChecking=no", "--ssh-option", "UserKnownHostsFile=/dev/null"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if MISSING:
        pytest.skip(f"OpenSSH not installed here ({', '.join(MISSING)} missing)")
    server = Server(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def finished_run(tiny, tmp_path_factory) -> Path:
    """A whole run for the CPU target: no TensorRT in its profile, which --remote takes all the same."""
    return make_finished_run(tiny, tmp_path_factory.mktemp("remote") / "run", "cpu")


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


def _error_line(err: str) -> str:
    """The one error line (the lines before it are the progress log: 'bench: already done ...')."""
    lines = [ln for ln in err.strip().splitlines() if ln.startswith(("error:", "Error:", "Usage:"))]
    assert len([ln for ln in lines if ln.lower().startswith("error:")]) == 1, err
    return next(ln for ln in lines if ln.lower().startswith("error:"))


def _fake_python(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "fakepy"
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)
    return p


# --- the whole round trip ----------------------------------------------------------------------------------
@needs_sshd
def test_remote_bench_over_ssh_merges_the_rows_with_the_host_named(sshd, run, tmp_path, cli):
    remote_dir = tmp_path / "remote"
    before = load_report(run / "report.json")
    host_rows = {r["path"]: r for r in before["models"]}
    code, out, err = cli("bench", run, *sshd.args(), "--remote-python", sys.executable, "--remote-dir", remote_dir, *FAST)
    assert code == 0, err
    rep = validate_report(load_report(run / "report.json"))
    remote = [r for r in rep["models"] if "merged_from" in r]
    assert [r["name"] for r in remote] == [f"student onnx {p} (on {sshd.host})" for p in ("int8", "fp32")]  # the CPU target makes no FP16
    assert [r for r in rep["models"] if "merged_from" not in r] == before["models"]  # the host's rows untouched
    assert rep["target"]["name"] == "cpu"  # the target stays the profile; the rows say where they ran
    for r in remote:
        assert r["device"].startswith(f"remote {sshd.host} cpu (1 thread, ONNX Runtime): ")
        assert r["latency_measured_on"] == "target" and r["runtime"] == "onnxruntime" and r["latency_ms"]["runs"] >= 5
        assert r["merged_from"]["remote"] == sshd.host and r["merged_from"]["target"] == "cpu"
        # all N_TEST held-out rows fit in the bundle, so the remote accuracy is the local ONNX model's, exactly
        local = host_rows[r["path"].split("/", 1)[1]]
        assert N_TEST <= 1000 and rep["data"]["heldout"] == N_TEST
        assert r["accuracy"] == local["accuracy"] and r["agreement"] == local["agreement"]
    assert any(n.startswith(f"Rows marked '(on {sshd.host})'") and "over SSH" in n for n in rep["notes"])
    assert f"(on {sshd.host})" in (run / "report.md").read_text() and f"(on {sshd.host})" in out
    assert list(remote_dir.iterdir()) == []  # the remote temporary folder is gone
    # a second remote bench replaces the rows the first one merged, never duplicates them
    code, _, err = cli("bench", run, *sshd.args(), "--remote-python", sys.executable, "--remote-dir", remote_dir, *FAST)
    assert code == 0, err
    assert len([r for r in load_report(run / "report.json")["models"] if "merged_from" in r]) == 2


@needs_sshd
def test_keep_remote_leaves_the_folder(sshd, run, tmp_path):
    remote_dir = tmp_path / "remote"
    api.remote_bench(run, sshd.host, port=sshd.port, identity=sshd.key, remote_python=sys.executable, remote_dir=str(remote_dir),
                     ssh_options=["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null"], keep_remote=True, min_runs=5, min_duration_s=0.01)
    (kept,) = remote_dir.iterdir()
    assert (kept / "report.json").is_file() and (kept / "bundle-cpu" / "run_on_device.py").is_file()


# --- failures: one line, the step and the host named ------------------------------------------------------
@needs_sshd
def test_closed_port_is_exit_2_naming_the_host(sshd, run, cli):
    args = sshd.args()
    args[args.index("--port") + 1] = _free_port()  # nothing listens there
    before = (run / "report.json").read_bytes()
    code, _, err = cli("bench", run, *args, "--remote-python", sys.executable)
    assert code == 2, err
    line = _error_line(err)
    assert "Traceback" not in err
    assert f"remote bench on {sshd.host}: connect" in line and "cannot connect" in line and "Connection refused" in line
    assert (run / "report.json").read_bytes() == before


@needs_sshd
def test_unknown_key_is_an_authentication_failure(sshd, run, cli):
    code, _, err = cli("bench", run, *sshd.args(key=sshd.other_key), "--remote-python", sys.executable)
    assert code == 2 and _error_line(err)
    assert f"remote bench on {sshd.host}: connect" in err and "authentication failed" in err and "Permission denied" in err


@needs_sshd
@pytest.mark.parametrize("case", ["no-onnxruntime", "no-python"])
def test_remote_python_without_onnxruntime_is_a_clear_error(sshd, run, tmp_path, cli, case):
    if case == "no-onnxruntime":  # this venv's Python with onnxruntime hidden, as on a machine that lacks it
        hide = tmp_path / "hide"
        hide.mkdir()
        (hide / "sitecustomize.py").write_text("import sys\nsys.modules['onnxruntime'] = None\n")
        py = _fake_python(tmp_path, f'PYTHONPATH={hide} exec {sys.executable} "$@"')
    else:
        py = tmp_path / "no" / "python3"
    remote_dir = tmp_path / "remote"
    code, _, err = cli("bench", run, *sshd.args(), "--remote-python", py, "--remote-dir", remote_dir)
    assert code == 2 and _error_line(err) and "Traceback" not in err, err
    assert f"remote bench on {sshd.host}: check python ({py} with numpy and onnxruntime) failed" in err
    assert ("onnxruntime" in err.split("failed", 1)[1]) if case == "no-onnxruntime" else ("not found" in err or "No such file" in err)
    assert "pip install numpy onnxruntime" in err and "--remote-python" in err
    assert list(remote_dir.iterdir()) == []


@needs_sshd
def test_failing_remote_run_is_exit_3_with_its_last_line(sshd, run, tmp_path, cli):
    # passes the import check (python -c ...), then fails as run_on_device.py would
    py = _fake_python(tmp_path, f'case "$1" in -c) exec {sys.executable} "$@";; esac\necho "some detail" >&2\n'
                                'echo "error: the device ran out of memory" >&2\nexit 3')
    remote_dir = tmp_path / "remote"
    before = (run / "report.json").read_bytes()
    code, _, err = cli("bench", run, *sshd.args(), "--remote-python", py, "--remote-dir", remote_dir)
    assert code == 3 and _error_line(err), err
    assert f"remote bench on {sshd.host}: run_on_device.py failed (exit 3): error: the device ran out of memory" in err
    assert list(remote_dir.iterdir()) == [] and (run / "report.json").read_bytes() == before


# --- no server needed ---------------------------------------------------------------------------------
def test_ssh_argv_is_a_list_with_user_options_first_and_batch_mode():
    s = Ssh("pi@10.0.0.2", 2222, Path("/k"), ["StrictHostKeyChecking=no"])
    argv = s.ssh("cd '/a b' && true")
    assert argv[0] == "ssh" and argv[-3:] == ["--", "pi@10.0.0.2", "cd '/a b' && true"]
    assert argv.index("StrictHostKeyChecking=no") < argv.index("BatchMode=yes")
    assert "StrictHostKeyChecking=accept-new" not in argv and ["-p", "2222"] == argv[argv.index("-p"):argv.index("-p") + 2]
    assert any(a.startswith("ConnectTimeout=") for a in argv)
    scp = s.scp("/x", s.remote("/tmp/y/"))
    assert scp[0] == "scp" and ["-P", "2222"] == scp[scp.index("-P"):scp.index("-P") + 2] and scp[-2:] == ["/x", "pi@10.0.0.2:/tmp/y/"]


@pytest.mark.parametrize("args,msg", [(["--remote", "-oProxyCommand=touch /tmp/x"], "is not a host"),
                                      (["--remote", "h", "--ssh-option", "-v"], "is not an ssh option"),
                                      (["--port", "22"], "go with --remote")])
def test_bad_remote_options_are_exit_2(finished_run, cli, args, msg):
    code, _, err = cli("bench", finished_run, *args)
    assert code == 2 and msg in _error_line(err), err


@pytest.mark.parametrize("args,msg", [(["--remote", "pi@host\n"], "is not a host"),
                                      (["--remote", "pi@host", "--remote-dir", "/tmp/a\n/tmp/b"], "control character"),
                                      (["--remote", "pi@host", "--ssh-option", "ProxyCommand=touch /tmp/x"], "~/.ssh/config")])
def test_bad_remote_options_are_refused_before_any_local_bench(tmp_path, cli, args, msg):
    """Parse-time usage errors: no run folder is even opened (this one is empty), so no minutes of local timing first."""
    code, _, err = cli("bench", tmp_path, *args)
    assert code == 2 and msg in _error_line(err) and "Usage:" in err, err


def test_host_remote_dir_and_ssh_option_checks():
    from compressor.errors import CompressError
    from compressor.remote import LOCAL_CODE_OPTIONS, check_host, check_remote_dir, check_ssh_option

    for good in ("pi@192.168.1.20", "host", "me@jetson.local", "a_b-c.d"):
        assert check_host(good) == good
    for bad in ("pi@host\n", "pi@host\r", "pi@ho st", "\tpi@host", "-oProxyCommand=x", "", "pi@host;id", "pi@$(id)"):
        with pytest.raises(CompressError, match="is not a host"):
            check_host(bad)
    assert check_remote_dir("/tmp/a b/ça") == "/tmp/a b/ça"
    for bad in ("", "/tmp/a\n/tmp/b", "/tmp/\x00", "/tmp/\x1b[2J", "/tmp/a\rb", "/tmp/\x85"):
        with pytest.raises(CompressError, match="remote-dir"):
            check_remote_dir(bad)
    assert check_ssh_option("StrictHostKeyChecking=no") == "StrictHostKeyChecking=no"
    for key in LOCAL_CODE_OPTIONS:
        for spelled in (key, key.lower(), key.upper()):
            with pytest.raises(CompressError, match=r"refused.*~/\.ssh/config"):
                check_ssh_option(f"{spelled}=sh -c id")
    with pytest.raises(CompressError, match="is not an ssh option"):
        check_ssh_option("BatchMode=no\nProxyCommand=id")


@pytest.mark.parametrize("remote_dir", ["abs with space", "relative dir", "-dash", None])
def test_the_remote_folder_is_read_from_its_marked_line_whatever_else_is_printed(tmp_path, remote_dir):
    """The mktemp command run by a local POSIX shell (as ssh runs it remotely), behind a login script that prints lines of
    its own: the folder comes back absolute, made where asked, never a line of noise (which 'rm -rf' would later get)."""
    from compressor.remote import _remote_folder, mktemp_command

    home = tmp_path / "home"
    home.mkdir()
    arg = str(tmp_path / remote_dir) if remote_dir == "abs with space" else remote_dir
    noise = "echo /etc; echo 'compress-bench.fake'; "
    proc = subprocess.run(["sh", "-c", noise + mktemp_command(arg) + "; echo /tmp"], capture_output=True, text=True, cwd=home,
                          env={**os.environ, "TMPDIR": str(tmp_path / "tmpdir"), "CDPATH": str(tmp_path)}, timeout=30)
    assert proc.returncode == 0, proc.stderr
    folder = _remote_folder(proc.stdout)
    expected_parent = {"abs with space": tmp_path / "abs with space", "relative dir": home / "relative dir", "-dash": home / "-dash",
                       None: tmp_path / "tmpdir"}[remote_dir]
    assert folder is not None and Path(folder).is_dir() and Path(folder).parent == expected_parent.resolve(), proc.stdout
    assert _remote_folder("/tmp/compress-bench.AAAAAAAA\n") is None  # an unmarked line is never taken for the folder
    assert _remote_folder("compress-remote-dir:relative/compress-bench.AAAAAAAA\n") is None
