"""The page at / in a real headless Chromium (selenium) with a fake camera fed from a generated
.y4m clip: the key goes in, the camera starts, frames reach the server's live session, a typed
question gets a streamed answer, the metrics show a TTFT and the plot a point. A screenshot of
the page is kept in test-output/web-page.png (and the pytest tmp dir); its path is printed."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from omnistream.entrypoints.api import Engine
from omnistream.server.app import build_app
from omnistream.server.config import ServerConfig
from tests.server_util import serve

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (CI installs them: .ci/run)")
KEY = "web-key"
SCREENSHOT = Path(__file__).resolve().parent.parent / "test-output" / "web-page.png"


def write_y4m(path: Path, frames: int = 30, width: int = 160, height: int = 120) -> Path:
    """A planar YUV 4:2:0 clip: a bright block sliding over a dark field, the colour drifting."""
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F10:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(frames):
            y = np.full((height, width), 40, np.uint8)
            x = (i * 5) % (width - 40)
            y[30:80, x:x + 40] = 220
            u = np.full((height // 2, width // 2), 90 + 4 * i, np.uint8)
            v = np.full((height // 2, width // 2), 170 - 3 * i, np.uint8)
            f.write(b"FRAME\n" + y.tobytes() + u.tobytes() + v.tobytes())
    return path


@pytest.fixture(scope="module")
def server():
    engine = Engine.from_pretrained("demo", engine_process=True)  # as `omnistream serve` runs it
    app = build_app(engine, ServerConfig(api_key=KEY))
    with serve(app) as url:
        yield url, app
    engine.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    clip = write_y4m(tmp_path_factory.mktemp("camera") / "clip.y4m")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                f"--use-file-for-fake-video-capture={clip}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_page_streams_the_camera_and_answers(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, app = server
    registry = app.state.omni.extras["sessions"]
    assert __import__("httpx").get(url + "/").status_code == 200  # the page itself needs no key
    browser.get(url + "/")
    el = lambda css: browser.find_element(By.CSS_SELECTOR, css)  # noqa: E731
    el("#api-key").send_keys(KEY)
    el("#fps").clear()
    el("#fps").send_keys("5")
    Select(el("#max-pixels")).select_by_value("12544")  # 112 x 112: quick on the CPU
    for field, value in (("#star-size", "4"), ("#stream-size", "4")):
        el(field).clear()
        el(field).send_keys(value)
    el("#start").click()

    # frames reach the server's live session (decoded there and ingested by its worker)
    entry = wait_for(lambda: registry.entries("live"), what="a live session")[0]
    wait_for(lambda: entry.session.memory.stats().frames_added >= 6, what="frames ingested server-side")
    assert entry.session.max_pixels == 12544 and entry.session.memory.config.star_capacity == 4
    assert el("#status").text == "live"
    assert int(el("#m-frames-sent").text) >= 6

    el("#question").send_keys("What is moving?")
    el("#ask").click()
    done = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#answers li.done"), what="an answer")[0]
    text = done.find_element(By.CSS_SELECTOR, ".text").text
    assert text.strip() and int(done.get_attribute("data-deltas")) > 1  # streamed, delta by delta
    final = done.get_attribute("data-final")
    assert " ".join(final.split()) == " ".join(text.split())  # the deltas add up to the final answer
    assert "TTFT" in done.find_element(By.CSS_SELECTOR, ".meta").text
    assert el("#m-ttft").text.endswith(" ms")
    assert int(el("#m-frames-received").text) >= 6 and el("#m-star").text.isdigit()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#ttft-plot circle")) == 1

    # frames keep flowing after the answer; a second question adds a point to the plot
    sent = int(el("#m-frames-sent").text)
    wait_for(lambda: int(el("#m-frames-sent").text) > sent + 2, what="more frames")
    el("#question").send_keys("And now?")
    el("#ask").click()
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#answers li.done")) == 2, what="a second answer")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#ttft-plot circle")) == 2
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

    shot = tmp_path / "web-page.png"
    browser.save_screenshot(str(shot))
    SCREENSHOT.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)
    print(f"\nweb page screenshot: {SCREENSHOT} (and {shot})")
    assert SCREENSHOT.stat().st_size > 10_000

    el("#stop").click()  # the socket closes: the server closes the live session
    wait_for(lambda: not registry.entries("live"), what="the live session closed")


def test_page_streams_a_local_video_file(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    from omnistream.media.samples import write_sample_video

    url, app = server
    registry = app.state.omni.extras["sessions"]
    clip = write_sample_video(tmp_path / "clip.webm", seconds=2.0, fps=10, width=160, height=120, codec="vp8")
    browser.get(url + "/")
    el = lambda css: browser.find_element(By.CSS_SELECTOR, css)  # noqa: E731
    el("#api-key").send_keys(KEY)
    el("#source-file").click()
    el("#file").send_keys(str(clip))
    el("#start").click()
    entry = wait_for(lambda: registry.entries("live"), what="a live session")[0]
    wait_for(lambda: entry.session.memory.stats().frames_added >= 4, what="frames of the file ingested server-side")
    assert entry.session.size is not None  # the file's frames were decoded and resized there
    el("#question").send_keys("What is in the video?")
    el("#ask").click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#answers li.done"), what="an answer")
    el("#stop").click()
    wait_for(lambda: not registry.entries("live"), what="the live session closed")
