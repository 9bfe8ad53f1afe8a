"""report.html: the Pareto front, a self-contained page (every model in the table and as one plot marker, every text escaped,
no URL to fetch), written by `compress report --html`, and opened for real in headless Chromium (no console error, a page
that is not blank). Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe): no driver package."""
from __future__ import annotations

import base64
import copy
import io
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from compressor.bench.html import pareto_front, render_html
from compressor.bench.report import validate_report

DATA = Path(__file__).parent / "data" / "report.json"


def _m(name, p50, acc, **kw):
    return {"name": name, "latency_ms": {"p50": p50}, "accuracy": acc, **kw}


def sample() -> dict:
    return json.loads(DATA.read_text(encoding="utf-8"))


# --- the Pareto front ----------------------------------------------------------------------------------------------------
def test_pareto_front_keeps_models_nothing_beats_on_both_axes_fastest_first():
    models = [_m("slow-best", 10.0, 0.99), _m("fast-worst", 1.0, 0.80), _m("mid", 3.0, 0.95),
              _m("dominated", 5.0, 0.90), _m("slower-and-worse", 20.0, 0.50)]
    assert pareto_front(models) == ["fast-worst", "mid", "slow-best"]


def test_pareto_front_ties():
    # as fast and less accurate is dominated; as accurate and slower is dominated; an exact twin is not
    models = [_m("a", 1.0, 0.9), _m("same-speed-worse", 1.0, 0.8), _m("same-acc-slower", 2.0, 0.9), _m("twin", 1.0, 0.9)]
    assert pareto_front(models) == ["a", "twin"]


def test_pareto_front_of_one_model_and_of_the_sample_report():
    assert pareto_front([_m("only", 0.0, 0.5)]) == ["only"]
    rep = sample()
    front = pareto_front(rep["models"])
    by = {m["name"]: m for m in rep["models"]}
    # brute force: on the front iff no other model is at least as good on both and better on one
    for m in rep["models"]:
        beaten = any(o["latency_ms"]["p50"] <= m["latency_ms"]["p50"] and o["accuracy"] >= m["accuracy"] and o is not m
                     and (o["latency_ms"]["p50"] < m["latency_ms"]["p50"] or o["accuracy"] > m["accuracy"]) for o in rep["models"])
        assert (m["name"] in front) is not beaten, m["name"]
    assert [by[n]["latency_ms"]["p50"] for n in front] == sorted(by[n]["latency_ms"]["p50"] for n in front)
    assert "student onnx int8" not in front  # slower and less accurate than the ONNX FP32 student in the sample


# --- the page ------------------------------------------------------------------------------------------------------------
def _points(page: str) -> list[str]:
    return re.findall(r'<g class="point" data-model="([^"]*)" data-place="([a-z]+)"', page)


def test_page_has_every_model_once_in_the_plot_and_the_table_and_fetches_nothing():
    rep = sample()
    page = render_html(rep)
    points = _points(page)
    assert sorted(n for n, _ in points) == sorted(m["name"] for m in rep["models"])
    cells = re.findall(r'<td class="model">([^<]*?)(?: <span|</td>)', page)
    assert cells == [m["name"] for m in rep["models"]]  # the table: one row per model, in the report's order
    assert "<svg" in page and "log scale" in page  # the sample's p50s span 0.018..0.49 ms
    assert not re.search(r"https?://", page)  # no stylesheet, font, script or image from anywhere
    assert "<script" not in page and "<link" not in page and " src=" not in page
    assert "agrees w/ teacher %" in page and "speed vs teacher" in page
    for note in rep["notes"][1:]:
        assert note.replace("'", "&#x27;") in page
    assert rep["host"]["cpu"] in page and rep["target"]["latency_note"] in page
    assert page.count("badge front") == len(pareto_front(rep["models"]))


def test_device_and_estimated_rows_get_their_own_marker_label_and_front():
    rep = sample()
    host_int8 = next(m for m in rep["models"] if m["precision"] == "int8")
    dev = copy.deepcopy(host_int8)
    dev.update(name="student onnx int8 (on jetson)", latency_measured_on="target", latency_ms={**dev["latency_ms"], "p50": 0.9},
               merged_from={"report": "device/report.json", "created": rep["created"], "target": "jetson", "runtime": "tensorrt"})
    fp16 = copy.deepcopy(dev)
    fp16.update(name="student onnx fp16 (on jetson)", precision="fp16", accuracy=0.95, latency_ms={**fp16["latency_ms"], "p50": 1.2})
    est = copy.deepcopy(host_int8)
    est.update(name="student int8 (estimated)", estimated=True, latency_ms={**est["latency_ms"], "p50": 0.05})
    rep["models"] += [dev, fp16, est]
    page = render_html(rep)
    places = dict(_points(page))
    assert places["student onnx int8 (on jetson)"] == places["student onnx fp16 (on jetson)"] == "device"
    assert places["student int8 (estimated)"] == "estimated" and places["teacher"] == "host"
    # one shape per place, each named in the legend
    assert "<rect" in page.split('data-model="student onnx fp16 (on jetson)"')[1].split("</g>")[0]
    assert "<polygon" in page.split('data-model="student int8 (estimated)"')[1].split("</g>")[0]
    assert "<circle" in page.split('data-model="teacher"')[1].split("</g>")[0]
    for label in ("measured on this host", "measured on the device", "estimated, not measured"):
        assert label in page
    assert page.count('class="front"') == 2  # host and device: each its own front line; a single estimate draws none
    assert "fp16" in page and 'class="badge device"' in page and 'class="badge estimated"' in page


def test_every_text_from_user_files_is_escaped():
    rep = sample()
    rep["models"][1]["name"] = '<script>alert("x")</script> & <img src=x onerror=y>'
    rep["notes"].append("<b>bold</b> & <style>")
    page = render_html(rep)
    assert "<script" not in page and "<img" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;img src=x onerror=y&gt;" in page
    assert len(_points(page)) == len(rep["models"])


def test_linear_scale_when_latencies_span_less_than_ten_times():
    rep = sample()
    for i, m in enumerate(rep["models"]):
        m["latency_ms"]["p50"] = 1.0 + i
    page = render_html(rep)
    assert "log scale" not in page and len(_points(page)) == len(rep["models"])


# --- the command ---------------------------------------------------------------------------------------------------------
def _run_dir(tmp_path: Path) -> Path:
    """A run directory holding what `compress report` reads: a manifest (the default configuration) and the sample report.json."""
    from compressor.config import CompressConfig
    from compressor.run import Run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    inputs = {"teacher": {"path": "/nonexistent/teacher.pt", "sha256": "0" * 64}, "data": {"source": "mnist1d", "fingerprint": "0"}}
    Run(run_dir, {"manifest_version": 1, "created": "2026-01-01T00:00:00+00:00", "config": CompressConfig().to_dict(), "inputs": inputs,
                  "stages": {}}).save()
    (run_dir / "report.json").write_text(DATA.read_text(encoding="utf-8"), encoding="utf-8")
    return run_dir


def test_report_command_writes_report_html_with_html_flag(tmp_path, cli):
    from compressor.api import report

    run_dir = _run_dir(tmp_path)
    code, out, err = cli("report", str(run_dir))
    assert code == 0, err
    assert not (run_dir / "report.html").exists()  # only asked for (the pipeline asks by default)
    code, out, err = cli("report", str(run_dir), "--html")
    assert code == 0, err
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "report.html" in out
    assert page == render_html(validate_report(json.loads((run_dir / "report.json").read_text(encoding="utf-8"))))
    # once there, a later render keeps it in step with report.json
    rep = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    rep["models"][0]["name"] = "teacher renamed"
    (run_dir / "report.json").write_text(json.dumps(rep), encoding="utf-8")
    report(run_dir)
    assert "teacher renamed" in (run_dir / "report.html").read_text(encoding="utf-8")


def test_the_pipeline_writes_report_html(tmp_path, monkeypatch):
    """compressor.compress (the bare `compress`) renders report.html next to report.md by default."""
    import compressor.api as api

    run_dir = _run_dir(tmp_path)
    monkeypatch.setattr(api, "distill", lambda cfg, out, **kw: api.Run.open(run_dir))
    for stage in ("export", "quantize"):
        monkeypatch.setattr(api, stage, lambda *a, **kw: None)
    monkeypatch.setattr(api, "bench", lambda d, **kw: json.loads((run_dir / "report.json").read_text(encoding="utf-8")))
    from compressor.config import CompressConfig

    api.compress(CompressConfig(), run_dir)
    assert (run_dir / "report.md").is_file()
    assert "student onnx int8" in (run_dir / "report.html").read_text(encoding="utf-8")
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["report"]["outputs"]["html"] == "report.html"


# --- headless Chromium ---------------------------------------------------------------------------------------------------
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """A minimal DevTools-protocol client over --remote-debugging-pipe (fd 3: to the browser, fd 4: from it)."""

    def __init__(self, exe: str, tmp: Path):
        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()

        def child_fds():  # runs before subprocess closes the fds it was not told to keep: 3 and 4 are kept
            r, w = os.dup(to_r), os.dup(from_w)  # so that neither dup2 below clobbers the other end
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={tmp / 'profile'}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=child_fds, pass_fds=(3, 4))
        os.close(to_r)
        os.close(from_w)
        self._buf, self._id, self.events = b"", 0, []

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._from, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30.0) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        os.write(self._to, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        while True:
            ev = self._read(deadline)
            self.events.append(ev)
            if ev.get("method") == method:
                return ev

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to)
        os.close(self._from)


def open_page(exe: str, tmp: Path, url: str, width: int = 1200, height: int = 900) -> tuple[bytes, list[str], list[str]]:
    """Load url; return a PNG screenshot, the console errors / uncaught exceptions / error log entries, and every URL requested."""
    browser = Chromium(exe, tmp)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=s)
        browser.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=s)
        browser.send("Page.navigate", {"url": url}, session=s)
        browser.wait_for("Page.loadEventFired")
        png = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"}, session=s)["data"])
    finally:
        browser.close()
    errors, requests = [], []
    for ev in browser.events:
        p = ev.get("params", {})
        if ev.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif ev.get("method") == "Runtime.exceptionThrown":
            errors.append("exception: " + p["exceptionDetails"].get("exception", {}).get("description", p["exceptionDetails"].get("text", "")))
        elif ev.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
            errors.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        elif ev.get("method") == "Network.requestWillBeSent":
            requests.append(p["request"]["url"])
    return png, errors, requests


needs_chromium = pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (Debian: apt-get install chromium; .ci/run installs it)")


@needs_chromium
def test_the_driver_sees_console_errors_and_failed_loads(tmp_path):
    """The check below means something: a page with a console error, an exception and a missing image is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><p>x</p><img src="missing.png"><script>console.error("boom"); nope();</script></body></html>')
    _, errors, requests = open_page(_chromium(), tmp_path, bad.as_uri(), 400, 300)
    text = "\n".join(errors)
    assert "console: boom" in text and "nope is not defined" in text and "missing.png" in text, errors
    assert any(u.endswith("missing.png") for u in requests)


@needs_chromium
def test_report_html_opens_in_headless_chromium_without_errors_and_is_not_blank(tmp_path):
    from PIL import Image

    rep = sample()
    rep["models"].append({**copy.deepcopy(rep["models"][-1]), "name": "student onnx int8 (on jetson)", "latency_measured_on": "target",
                          "merged_from": {"report": "r.json", "created": rep["created"], "target": "jetson", "runtime": "tensorrt"}})
    page = tmp_path / "report.html"
    page.write_text(render_html(rep), encoding="utf-8")
    png, errors, requests = open_page(_chromium(), tmp_path, page.as_uri())
    (tmp_path / "screenshot.png").write_bytes(png)
    assert errors == [], errors
    assert requests and all(u.startswith(("file:", "data:", "about:")) for u in requests), requests  # nothing from the network
    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert img.size == (1200, 900)
    colours = img.getcolors(maxcolors=1 << 20)
    assert len(colours) > 20, "the screenshot is (nearly) blank"
    non_white = sum(n for n, c in colours if c != (255, 255, 255))
    assert non_white > 0.02 * img.size[0] * img.size[1], non_white
    # the plot's markers are drawn in their colours: the teacher's purple is on screen
    assert any(abs(c[0] - 0x7b) < 8 and abs(c[1] - 0x32) < 8 and abs(c[2] - 0x94) < 8 for _, c in colours)


def test_estimates_get_their_own_table_and_stay_off_the_plot():
    rep = sample()
    rep["estimates"] = [{"name": "student onnx int8", "target": "jetson-orin-nano-8gb", "precision": "int8", "latency_ms": 0.0213,
                         "bound": "per-layer overhead", "macs": 19000, "method": "roofline", "estimated": True}]
    validate_report(rep)
    html = render_html(rep)
    assert "Estimated on jetson-orin-nano-8gb (not measured)" in html and "0.021" in html
    assert html.count('class="point"') == len(rep["models"])  # measured rows only on the plot
