"""The demo served on 127.0.0.1 and used as a person would: in headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium) with a class, a guidance colour and a seed, and by a burst of
concurrent API clients.

The browser test is skipped only where Chromium is not installed; .ci/run installs it.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from difflab.app.service import Limits
from difflab.models.model import DEFAULT_CFG_SCALE
from helpers.web import fetch_pixels, free_port, needs_chromium, set_number

BURST = 20


@pytest.fixture(scope="module")
def served(conditional_model, tmp_path_factory):
    """The demo of the tiny class-conditional model, on a free loopback port; its URL."""
    from difflab.app import build_demo, launch

    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    demo = build_demo(conditional_model, limits=Limits(max_steps=10, max_images=4, max_queue=BURST + 4))
    port = free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def choose(driver, elem_id: str, option: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input").click()
    item = WebDriverWait(driver, 10).until(ec.element_to_be_clickable(
        (By.CSS_SELECTOR, f"ul.option-list li[aria-label='{option}']")))
    item.click()


def pick_color(driver, elem_id: str, hex_value: str) -> None:
    """Open the colour picker, type the colour into its text field, close it; wait until the swatch shows it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.CSS_SELECTOR, f"#{elem_id} button.dialog-button").click()
    field = WebDriverWait(driver, 10).until(
        lambda d: d.find_element(By.CSS_SELECTOR, f"#{elem_id} .color-picker input[type=text]"))
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(hex_value, Keys.ENTER)
    driver.find_element(By.TAG_NAME, "h2").click()  # outside the picker: closes it
    r, g, b = (int(hex_value[i:i + 2], 16) for i in (1, 3, 5))
    WebDriverWait(driver, 10).until(lambda d: f"rgb({r}, {g}, {b})" in d.find_element(
        By.CSS_SELECTOR, f"#{elem_id} button.dialog-button").get_attribute("style"))


def generate(driver, seed: int) -> list[str]:
    """Set the seed, click Generate; the gallery's image URLs once it shows this seed's images, loaded.
    (The URLs name files by their content, so the same image twice has the same URL.)"""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    set_number(driver, "seed", seed)
    driver.find_element(By.ID, "generate").click()

    def shown(d):
        gallery = d.find_element(By.ID, "gallery")
        images = gallery.find_elements(By.CSS_SELECTOR, "img")
        loaded = images and all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                                for i in images)
        if f"seed {seed} ·" not in gallery.text or not loaded:
            return False
        return list(dict.fromkeys(i.get_attribute("src") for i in images))

    return WebDriverWait(driver, 120, poll_frequency=0.5).until(shown)


@needs_chromium
def test_browser_generates_and_same_seed_gives_same_image(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(served)
    WebDriverWait(browser, 90).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#class input")
                                     and "Loading..." not in d.find_element(By.TAG_NAME, "body").text)
    choose(browser, "class", "7")
    pick_color(browser, "color", "#ffffff")
    set_number(browser, "color-scale", 200)
    set_number(browser, "steps", 4)
    set_number(browser, "count", 2)
    try:
        first = generate(browser, 1234)
        browser.save_screenshot(str(tmp_path / "demo.png"))
        other = generate(browser, 99)
        again = generate(browser, 1234)
    except Exception:
        browser.save_screenshot(str(tmp_path / "failed.png"))
        raise
    assert len(first) == len(other) == len(again) == 2
    page = browser.find_element(By.ID, "gallery").text
    assert f"seed 1234 · class 7 (CFG {DEFAULT_CFG_SCALE:g}) · dpm++2m, 4 steps · colour #ffffff ×200" in page, page
    assert "seed 1235 · class 7" in page, page
    (a, settings), (b, _) = fetch_pixels(first[0]), fetch_pixels(again[0])
    assert settings == {"model": "conditional", "sampler": "dpm++2m", "steps": 4, "seed": 1234, "class": "7",
                        "cfg_scale": DEFAULT_CFG_SCALE, "color": "#ffffff", "color_scale": 200.0}
    assert a.shape == (8, 8) and np.array_equal(a, b)  # same seed, same image
    assert not np.array_equal(a, fetch_pixels(other[0])[0])
    assert not np.array_equal(a, fetch_pixels(first[1])[0])
    print(f"screenshot: {tmp_path / 'demo.png'}")


def test_burst_of_concurrent_requests_all_answered(served):
    """BURST clients at once over loopback: each request waits its turn in the queue and is answered."""
    from gradio_client import Client

    def one(seed: int):
        client = Client(served, verbose=False, download_files=False)
        return client.predict("ddim", 2, seed, 1, str(seed % 10), 2.0, "#ff0000", 0, "", 0, api_name="/generate")

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=BURST) as pool:
        results = list(pool.map(one, range(BURST), timeout=300))
    assert len(results) == BURST
    for seed, (gallery, files) in enumerate(results):
        assert len(gallery) == len(files) == 1
        assert gallery[0]["caption"].startswith(f"seed {seed} · class {seed % 10} ")
    assert time.monotonic() - start < 300
