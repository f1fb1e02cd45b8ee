"""The Gradio app on the tiny repositories: named API endpoints (gradio_client) and a real Chromium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
SMALL_BUCKETS = "80x128,96x112,112x96,128x80"
CHROMIUM = Path("/usr/bin/chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningApp:
    def __init__(self, process: subprocess.Popen, url: str, log: Path, results: Path):
        self.process, self.url, self.log, self.results = process, url, log, results


def _start_app(tmp_path: Path, models_dir: Path, *extra: str) -> RunningApp:
    port = _free_port()
    log = tmp_path / "app.log"
    results = tmp_path / "results"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PAINTS_UNDO_VIDEO_BUCKETS=SMALL_BUCKETS)
    process = subprocess.Popen(
        [sys.executable, "gradio_app.py", "--models-dir", str(models_dir), "--port", str(port),
         "--results-dir", str(results), *extra],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app exited early:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return RunningApp(process, url, log, results)
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"app did not start:\n{log.read_text()}")


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models_dir):
    running = _start_app(tmp_path_factory.mktemp("app"), tiny_models_dir)
    yield running
    running.process.terminate()
    try:
        running.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        running.process.kill()
    assert "Traceback" not in running.log.read_text()


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app.url, verbose=False)


# -- gradio_client: the named endpoints ---------------------------------------------------------------


def test_named_endpoints_run_the_three_steps(client):
    from gradio_client import handle_file

    from paints_undo.export import probe_video

    assert {"/tag", "/keyframes", "/video"} <= set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    prompt = client.predict(handle_file(str(ROOT / "imgs" / "1.png")), api_name="/tag")
    assert isinstance(prompt, str) and prompt
    gallery = client.predict(handle_file(str(ROOT / "imgs" / "1.png")), prompt, [900, 999], 1, 256, 256, 1, "", 3.0,
                             api_name="/keyframes")
    assert len(gallery) == 4
    items = [{"image": handle_file(g["image"]), "caption": g.get("caption")} for g in gallery]
    video, frames, files = client.predict(items, None, "1girl", 1, 7.5, 4, 123, api_name="/video")
    assert len(frames) == 45 and probe_video(video)["codec"] == "h264"
    assert sorted(Path(f).suffix for f in files) == [".json", ".mp4", ".zip"]


def test_endpoints_report_bad_input_as_messages(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Upload an image first"):
        client.predict(None, api_name="/tag")
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    with pytest.raises(AppError, match="not an image"):
        client.predict(handle_file(str(not_image)), api_name="/tag")
    with pytest.raises(AppError, match="at least one"):
        client.predict(handle_file(str(ROOT / "imgs" / "2.png")), "", [], 1, 256, 256, 1, "", 3.0, api_name="/keyframes")
    with pytest.raises(AppError, match="two key frames"):
        client.predict([], None, "x", 1, 7.5, 4, 1, api_name="/video")
    # The server keeps serving after errors.
    assert client.predict(handle_file(str(ROOT / "imgs" / "3.png")), api_name="/tag")


def test_lineart_and_sketches_endpoints(client):
    import json
    import zipfile

    import numpy as np
    from gradio_client import handle_file
    from PIL import Image

    from lineart_models import sketch_output_size

    image = ROOT / "imgs" / "2.png"
    gallery, files = client.predict(handle_file(str(image)), ["lineart"], api_name="/lineart")
    assert [g["caption"] for g in gallery] == ["lineart"]
    with Image.open(image) as im:
        expected = sketch_output_size(im.height, im.width)
    assert np.array(Image.open(gallery[0]["image"])).shape[:2] == expected
    assert sorted(Path(f).suffix for f in files) == [".json", ".zip"]
    with zipfile.ZipFile(next(f for f in files if f.endswith(".zip"))) as zf:
        assert sorted(zf.namelist()) == ["lineart.json", "lineart/lineart.png"]

    line_art, sketches, files = client.predict(handle_file(str(image)), "x", ["lineart"], [950, 999], 2, 5, 256, 256,
                                               1, "", 3.0, api_name="/sketches")
    assert [g["caption"] for g in line_art] == ["lineart"]
    captions = [g["caption"] for g in sketches]
    assert len(captions) == 4 and captions[0].startswith("#1 score ") and captions[3].startswith("#4 score ")
    assert {c.split("(")[1] for c in captions} == {"seed 5, step 950)", "seed 5, step 999)", "seed 6, step 950)",
                                                   "seed 6, step 999)"}
    assert np.array(Image.open(sketches[0]["image"])).shape == (256, 256, 3)
    doc = json.loads(Path(next(f for f in files if f.endswith(".json"))).read_text())
    scores = [s["score"] for s in doc["sketches"]]
    assert scores == sorted(scores) and doc["settings"]["num_sets"] == 2
    with zipfile.ZipFile(next(f for f in files if f.endswith(".zip"))) as zf:
        names = zf.namelist()
    assert "sketches.json" in names and "lineart/lineart.png" in names
    assert sum(n.startswith("sketches/rank_0") for n in names) == 4


def test_sketch_endpoints_report_bad_input_as_messages(client):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    image = handle_file(str(ROOT / "imgs" / "2.png"))
    with pytest.raises(AppError, match="Upload an image first"):
        client.predict(None, ["lineart"], api_name="/lineart")
    with pytest.raises(AppError, match="at least one line-art detector"):
        client.predict(image, [], api_name="/lineart")
    with pytest.raises(AppError, match="at least one sketch step"):
        client.predict(image, "x", ["lineart"], [], 1, 5, 256, 256, 1, "", 3.0, api_name="/sketches")


def test_app_starts_without_models_and_says_what_is_missing(tmp_path):
    running = _start_app(tmp_path, tmp_path / "no-models")
    try:
        with urllib.request.urlopen(running.url + "config", timeout=10) as r:
            config = r.read().decode()
        assert "paints_undo_single_frame" in config and "HF_HUB_OFFLINE" in config
        from gradio_client import Client, handle_file
        from gradio_client.exceptions import AppError

        with pytest.raises(AppError, match="paints_undo_single_frame"):
            Client(running.url, verbose=False).predict(handle_file(str(ROOT / "imgs" / "1.png")), "", [999], 1, 256,
                                                        256, 1, "", 3.0, api_name="/keyframes")
    finally:
        running.process.terminate()
        running.process.wait(timeout=20)


def test_share_without_internet_fails_clearly_and_public_bind_warns(tmp_path, tiny_models_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    result = subprocess.run([sys.executable, "gradio_app.py", "--models-dir", str(tiny_models_dir), "--share",
                             "--port", str(_free_port()), "--results-dir", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "no share link could be created" in result.stderr
    assert "WITHOUT a login" in result.stderr


def test_bad_auth_flag_is_rejected():
    result = subprocess.run([sys.executable, "gradio_app.py", "--auth", "nopassword"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "USER:PASSWORD" in result.stderr


# -- a real browser -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (/usr/bin/chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, viewport={"width": 1280, "height": 2400},
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required"],
        )
        page = context.new_page()
        page.set_default_timeout(120_000)
        yield page
        context.close()


def _set_number(page, elem_id: str, value) -> None:
    field = page.locator(f"#{elem_id} input[type=number]")
    field.fill(str(value))
    field.press("Enter")


def _wait_enabled(page, elem_id: str) -> None:
    page.wait_for_function(f"() => !document.querySelector('#{elem_id}').disabled")


@pytest.mark.browser
def test_browser_three_steps_stop_and_bad_upload(app, browser_page, tmp_path):
    page = browser_page
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(app.url)
    page.locator("#input_image input[type=file]").set_input_files(str(ROOT / "imgs" / "1.png"))
    _wait_enabled(page, "tag_button")
    page.click("#tag_button")
    page.wait_for_function("() => document.querySelector('#prompt textarea').value.length > 0")

    for elem_id, value in (("steps", 1), ("width", 256), ("height", 256), ("i2v_steps", 1)):
        _set_number(page, elem_id, value)
    _wait_enabled(page, "keyframes_button")
    page.click("#keyframes_button")
    page.wait_for_function("() => document.querySelectorAll('#keyframes_gallery img').length >= 8")

    _wait_enabled(page, "video_button")
    page.click("#video_button")
    page.wait_for_function(
        "() => { const v = document.querySelector('#output_vid video'); return v && v.readyState >= 2 && !v.error"
        " && v.src.includes('paints_undo_') && !v.src.includes('preview'); }",
        timeout=300_000,
    )
    page.wait_for_function("() => document.querySelectorAll('#downloads a, #downloads .file-name').length >= 3 ||"
                           " document.querySelector('#downloads').innerText.includes('.zip')")
    played = page.evaluate(
        "async () => { const v = document.querySelector('#output_vid video'); v.muted = true; await v.play();"
        " await new Promise(r => setTimeout(r, 600)); return v.currentTime; }")
    assert played > 0
    page.screenshot(path=str(ARTIFACTS / "browser_three_steps.png"), full_page=True)

    # Stop mid-run: a long video job ends between two sampler steps and the queue is free again.
    _set_number(page, "i2v_steps", 60)
    page.click("#video_button")
    page.wait_for_function("() => document.querySelector('#output_vid').innerText.includes('Generating') ||"
                           " document.querySelector('.progress-text, .eta-bar, .progress-level') !== null",
                           timeout=60_000)
    started = time.time()
    page.click("#video_stop")
    page.locator("#prompt textarea").fill("")
    page.click("#tag_button")
    page.wait_for_function("() => document.querySelector('#prompt textarea').value.length > 0", timeout=60_000)
    assert time.time() - started < 60, "the stopped job released the GPU queue"

    # A bad upload shows a message, and the server keeps serving.
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    page.locator("#input_image input[type=file]").set_input_files(str(bad))
    page.wait_for_timeout(1000)
    if page.locator("#tag_button").is_enabled():
        page.click("#tag_button")
    page.wait_for_function("() => document.body.innerText.includes('not an image')", timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "browser_bad_upload.png"), full_page=True)
    assert app.process.poll() is None


@pytest.mark.browser
def test_browser_sketch_tab_extracts_line_art(app, browser_page):
    page = browser_page
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(app.url)
    page.locator("#input_image").wait_for(state="visible")  # the three-step UI is the default tab
    assert not page.locator("#sketch_image").is_visible()
    page.get_by_role("tab", name="Sketch & line art").click()
    page.locator("#sketch_image input[type=file]").set_input_files(str(ROOT / "imgs" / "2.png"))
    page.wait_for_function("() => document.querySelector('#sketch_image img') !== null")
    for name in ("manga", "anime"):
        page.locator("#sketch_detectors").get_by_label(name, exact=True).uncheck()
    assert page.locator("#sketch_detectors").get_by_label("lineart", exact=True).is_checked()
    page.click("#lineart_button")
    page.wait_for_function("() => document.querySelectorAll('#lineart_gallery img').length >= 1")
    page.wait_for_function("() => document.querySelector('#sketch_downloads').innerText.includes('.zip')")
    assert page.locator("#lineart_gallery").inner_text().count("lineart") >= 1
    page.screenshot(path=str(ARTIFACTS / "browser_sketch_tab.png"), full_page=True)
    assert app.process.poll() is None
