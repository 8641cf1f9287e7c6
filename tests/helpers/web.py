"""What the demo's tests share: a free loopback port, headless Chromium, and an exported Space served
with `python app.py` as Hugging Face would run it."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1100"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def chromium(profile: Path) -> Iterator:
    """A headless Chromium driven by selenium, with its own profile folder."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def space_environment() -> dict[str, str]:
    """The environment an exported Space runs in here: no PYTHONPATH, so it imports its own difflab."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


# Gradio's launch() gives up when one HEAD request to its own page takes over 3 s ("When localhost is not
# accessible, a shareable link must be created"), which a CPU busy with other tests can cause; the probe tests
# Gradio, not the Space, so the app runs as it is, without it.
RUN_APP_WITHOUT_PROBE = (
    "import os, runpy, sys; import gradio.networking as n; n.url_ok = lambda url: True; "
    "sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(sys.argv[0])); "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


@contextmanager
def served_space(space: Path, workdir: Path, timeout: float = 300) -> Iterator:
    """Run the exported Space's `app.py` on a free port; yield a gradio Client once it answers."""
    from gradio_client import Client

    port = free_port()
    env = space_environment()
    env.update(GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(workdir / "g"))
    log_path = workdir / "app.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-c", RUN_APP_WITHOUT_PROBE, str(space / "app.py")], cwd=workdir,
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            client = None
            deadline = time.monotonic() + timeout
            while client is None and time.monotonic() < deadline:
                assert server.poll() is None, log_path.read_text()[-2000:]
                try:
                    client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
                except Exception:
                    time.sleep(1)
            assert client is not None, f"the exported app did not answer within {timeout:.0f} s"
            yield client
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def fetch_pixels(url: str) -> tuple[np.ndarray, dict]:
    """A PNG the demo served: its pixels and its difflab settings."""
    with urllib.request.urlopen(url, timeout=30) as response:
        image = Image.open(io.BytesIO(response.read()))
        image.load()
    return np.asarray(image), json.loads(image.info["difflab"])


def set_number(driver, elem_id: str, value) -> None:
    """Type `value` into a Gradio number field (select all, type, leave the field)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.TAB)
