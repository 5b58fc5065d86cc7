"""The ranger console in a real browser (Debian's Chromium driven by Playwright), against a real
``edge-retrieval server --http`` process, a real Mosquitto and a real daemon with the default
BirdNET bundle (CC BY-NC-SA 4.0) on a recording of two real fixture clips:

A = a saw (power_tool) that "car engine" wrongly fires on, B = a jet engine it rightly fires on.
Log in; the device shows online; an alert is added after its preview and reaches the device;
both detections appear live with a playable clip and a spectrogram; A is marked a false alarm;
the same recording played again gives B only; logging out ends access. Screenshots of the main
pages go to docs/img/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edge_retrieval.cli import main as cli_main
from edge_retrieval.cli.commands.keys import generate
from edge_retrieval.config import load_config
from edge_retrieval.device.agent import DeviceAgent
from edge_retrieval.device.daemon import Daemon
from edge_retrieval.offline.scenes import load_clip, sounds_dir
from edge_retrieval.server import ServerStore
from tests.fixtures_broker import free_port
from tests.mqtt_helpers import Recorder, device_config, wait_for

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("starlette")

CHROMIUM = shutil.which("chromium")
REPO = Path(__file__).resolve().parent.parent
IMG = REPO / "docs" / "img"
A_CLIP = ("power_tool", "power_tool_supertux_saw")  # "car engine" fires on it: a false alarm
B_CLIP = ("engine", "engine_searchandrescue_jet_engine_outside")  # a true engine
PASSWORD = "ranger password 1"
RATE = 48000
EVIL_SITE = "<script>alert(1)</script> ridge"


def _recording(path: Path) -> tuple[float, float]:
    """quiet 3 s, A, quiet 4 s, B, quiet 3 s; returns (end of A, start of B) in seconds."""
    clips = [sounds_dir() / c / f"{i}.wav" for c, i in (A_CLIP, B_CLIP)]
    if not all(p.is_file() for p in clips):
        pytest.skip("fixture clips missing (scripts/fetch_sounds.py)")
    rng = np.random.default_rng(0)

    def quiet(s: float) -> np.ndarray:
        return (0.003 * rng.standard_normal(int(s * RATE))).astype(np.float32)

    a, b = (load_clip(p, RATE, 12.0) for p in clips)
    sf.write(str(path), np.concatenate([quiet(3), a, quiet(4), b, quiet(3)]), RATE)
    return 3 + a.size / RATE, 7 + a.size / RATE


def _play(cfg, daemon_events: Recorder | None = None) -> list:  # noqa: ANN001
    """One run of the device over the recording; returns its final events once delivered."""
    rec = daemon_events or Recorder()
    daemon = Daemon.from_config(cfg, sinks=[rec])
    agent = DeviceAgent(cfg, daemon, attach=True)
    agent.start()
    return [agent, daemon, rec]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian package chromium is not installed")
def test_console_in_a_browser(tmp_path: Path, broker, birdnet_bundle) -> None:  # noqa: ANN001
    priv, pub = generate(tmp_path / "keys")
    db = tmp_path / "server.sqlite"
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    assert cli_main(["users", "add", "ranger1", "--role", "ranger", "--password-file", str(pw), "--db", str(db)]) == 0
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        [sys.executable, "-m", "edge_retrieval.cli", "server", "--broker", broker.url, "--db", str(db), "--key",
         str(priv), "--bundle", str(birdnet_bundle.root), "--http", f"127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    audio = tmp_path / "scene.wav"
    a_end, b_start = _recording(audio)
    cfg_path, _ = device_config(tmp_path, broker.url, birdnet_bundle.root, audio, device_id="dev-1", groups=(),
                                public_key=pub, realtime=False, health_s=1.0)
    text = cfg_path.read_text().replace("[device]\n", f'[device]\nsite = "{EVIL_SITE}"\nlat = -1.5\nlon = 36.8\n')
    cfg_path.write_text(text + "[clips]\nenabled = true\npre_s = 1.0\npost_s = 1.0\n")
    cfg = load_config(cfg_path)
    store = ServerStore(db)
    IMG.mkdir(parents=True, exist_ok=True)
    runs: list = []
    try:
        wait_for(lambda: "console http" in (tmp_path / "server.log").read_text(), 60, "the server with its console")
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--autoplay-policy=no-user-gesture-required"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(30_000)

            # log in
            page.goto(base + "/devices")
            assert "/login" in page.url
            page.fill("input[name=name]", "ranger1")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(base + "/devices")

            # the device comes online (its agent, before any audio)
            agent, daemon, rec = _play(cfg)
            runs.append((agent, daemon))
            wait_for(lambda: store.device("dev-1") is not None, 20, "the device's status at the server")
            page.goto(base + "/devices")
            assert page.locator("tr.device[data-device=dev-1] td.state").inner_text().startswith("online")

            # add an alert: preview (what the text resolves to) first, then send it to the device
            page.goto(base + "/alerts")
            page.fill("input[name=text]", "car engine")
            page.fill("input[name=threshold]", "0.2")
            page.select_option("select[name=target_kind]", "device")
            page.fill("input[name=target]", "dev-1")
            page.click("#preview-alert")
            page.wait_for_selector("#preview-result")
            assert page.locator("#preview-result table.labels tr").count() >= 3  # labels and weights shown
            assert len(daemon.matcher) == 0  # nothing sent yet
            page.screenshot(path=str(IMG / "console-alert-preview.png"), full_page=True)
            page.click("#confirm-alert")
            page.wait_for_url(base + "/alerts")
            alert_id = page.locator("tr.alert").first.get_attribute("data-alert")
            wait_for(lambda: len(daemon.matcher) == 1, 20, "the alert on the device")

            # detections appear live (server-sent events) while the page stays open
            page.goto(base + "/detections")
            page.wait_for_selector("#live.on")
            daemon.start()
            daemon.join(120)
            finals = [e for e in rec.events if e.final]
            a_ev = [e for e in finals if e.start_s < a_end]
            b_ev = [e for e in finals if e.start_s >= b_start - 1]
            assert a_ev and b_ev, [(e.start_s, e.end_s) for e in finals]
            a_row = f"#det-dev-1-{a_ev[0].event_id}"
            page.wait_for_selector(f"{a_row} audio", timeout=60_000)  # final update + clip, no reload
            page.wait_for_selector(f"#det-dev-1-{b_ev[0].event_id} audio", timeout=60_000)
            # the clip plays: the audio element knows its duration; the spectrogram loads
            dur = page.eval_on_selector(f"{a_row} audio", """a => new Promise(ok => {
                if (a.readyState >= 1) ok(a.duration); a.onloadedmetadata = () => ok(a.duration);
                a.onerror = () => ok(-1); a.load(); })""")
            assert dur > 1.0, dur
            page.wait_for_function(f"() => document.querySelector('{a_row} img.spec').naturalWidth > 0")
            assert "<script>" not in page.locator(f"{a_row}").inner_html()
            assert "<script>alert(1)</script> ridge" in page.locator(f"{a_row}").inner_text()  # shown as text
            page.screenshot(path=str(IMG / "console-detections.png"), full_page=True)

            # A is a false alarm: the alert gets a new version with a negative, pushed to the device
            v1 = daemon.matcher.get(alert_id).version
            page.click(f"{a_row} button.false-alarm")
            page.wait_for_selector(f"{a_row} .given")
            wait_for(lambda: (q := daemon.matcher.get(alert_id)) is not None and q.version > v1 and q.negatives,
                     20, "the revised alert on the device")
            agent.stop()

            # the same recording again: A stays silent, B still fires
            agent2, daemon2, rec2 = _play(cfg)
            runs.append((agent2, daemon2))
            wait_for(lambda: (q := daemon2.matcher.get(alert_id)) is not None and q.negatives, 20, "the query")
            daemon2.start()
            daemon2.join(120)
            finals2 = [e for e in rec2.events if e.final]
            assert not [e for e in finals2 if e.start_s < a_end], [(e.start_s, e.end_s) for e in finals2]
            b2 = [e for e in finals2 if e.start_s >= b_start - 1]
            assert b2, [(e.start_s, e.end_s) for e in finals2]
            page.wait_for_selector(f"#det-dev-1-{b2[0].event_id}", timeout=60_000)
            wait_for(lambda: (store.device("dev-1") or {}).get("health", {}).get("suppressed", {}).get(alert_id), 20,
                     "the suppressed count in the device's health")
            page.goto(base + "/alerts")
            assert int(page.locator(f"tr.alert[data-alert='{alert_id}'] td.suppressed").inner_text().split()[0]) > 0
            page.screenshot(path=str(IMG / "console-alerts.png"), full_page=True)
            page.goto(base + "/devices")
            page.screenshot(path=str(IMG / "console-devices.png"), full_page=True)

            # logging out ends access
            page.click("#logout")
            page.wait_for_url(base + "/login")
            page.goto(base + "/detections")
            assert "/login" in page.url
            assert page.request.get(base + "/api/detections").status == 401
            browser.close()
    finally:
        for agent, daemon in runs:
            daemon.stop()
            agent.stop()
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        store.close()
        print((tmp_path / "server.log").read_text()[-3000:])
    assert time.time()  # the test's assertions are above; this keeps ruff from folding the finally
