"""The text demo's tabs chained, in headless Chromium: "Send to img2img" puts the chosen result into the
img2img tab, and generating there gives the image `difflab sample --image` gives; "Send to inpainting"
puts it into the inpainting tab's editor; the LoRA picker gives images that differ from the base model's
and equal `difflab sample --lora`'s for the same settings. Set DIFFLAB_SCREENSHOTS=DIR to keep the
screenshot docs/demo.md shows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difflab.app.service import Limits
from difflab.cli import main
from helpers.loras import tiny_loras
from helpers.web import fetch_pixels, free_port, needs_chromium, set_number
from test_demo_browser import choose
from test_demo_text_browser import keep_screenshot, open_page, type_into, upload

PROMPT = "a fox"
SAME = dict(sampler="dpm++2m", steps=4)  # what the page is set to and the CLI is given


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_loras(tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="module")
def served(files, tmp_path_factory):
    from difflab.app import build_demo, launch

    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    demo = build_demo(files["base"], limits=Limits(max_steps=10, max_images=2, max_image_size=64),
                      loras=[files["a"], files["b"]])
    port = free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def generate_until(driver, mode: str, seed: int, captions: list[str]) -> list[str]:
    """Click the tab's Generate; the gallery's image URLs, in order, once its images are captioned `captions` (read
    from the grid's images, there in the preview of one image too)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    set_number(driver, "seed", seed)
    driver.find_element(By.ID, f"generate-{mode}").click()

    def shown(d):
        toasts = [t.text for t in d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]") if t.text.strip()]
        if toasts:
            raise AssertionError(f"no images for {captions}: the page says {toasts}")
        images = d.find_elements(By.CSS_SELECTOR, "#gallery button.thumbnail-lg img")
        if [i.get_attribute("alt") for i in images] != captions or not all(
                d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) for i in images):
            return False
        return [i.get_attribute("src") for i in images]

    return WebDriverWait(driver, 120, poll_frequency=0.3).until(shown)


def selected_tab(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, "#modes button[role=tab][aria-selected=true]").text


def cli_images(tmp_path: Path, name: str, *args, seed: int, count: int) -> list[np.ndarray]:
    """`difflab sample` with the page's settings: its PNGs' pixels."""
    out = tmp_path / name
    assert main(["-q", "sample", "--prompt", PROMPT, "--sampler", SAME["sampler"], "--steps", str(SAME["steps"]),
                 "--seed", str(seed), "-n", str(count), "--precision", "no", "--out", str(out / "grid.png"),
                 "--out-dir", str(out / "each"), *map(str, args)]) == 0
    return [np.asarray(Image.open(out / "each" / f"{seed + i:06d}.png")) for i in range(count)]


@needs_chromium
def test_send_to_img2img_and_to_inpainting(served, files, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, served)
    type_into(browser, "#prompt textarea", PROMPT)
    set_number(browser, "steps", SAME["steps"])
    set_number(browser, "count", 2)
    try:
        results = generate_until(browser, "txt2img", 21, [f"seed {s} · CFG 7.5 · dpm++2m, 4 steps · 16×16"
                                                          for s in (21, 22)])
        browser.find_element(By.CSS_SELECTOR, "#gallery button.thumbnail-lg[aria-label='Thumbnail 2 of 2']").click()
        browser.find_element(By.ID, "send-img2img").click()
        WebDriverWait(browser, 30).until(lambda d: selected_tab(d) == "Image to image"
                                         and d.find_elements(By.CSS_SELECTOR, "#img2img-image img"))
        sent = browser.find_element(By.CSS_SELECTOR, "#img2img-image img").get_attribute("src")
        set_number(browser, "img2img-strength", 0.5)
        img2img = generate_until(browser, "img2img", 3, [
            f"seed {s} · CFG 7.5 · dpm++2m, 4 steps · 16×16 · image to image, strength 0.5" for s in (3, 4)])
        keep_screenshot(browser, tmp_path, "demo_text_send.png")
        browser.find_element(By.ID, "send-inpaint").click()  # the preview still shows the second: it is sent
        WebDriverWait(browser, 30).until(lambda d: selected_tab(d) == "Inpainting")
        mask = Image.new("L", (16, 16))
        mask.paste(255, (8, 0, 16, 16))
        mask.save(tmp_path / "mask.png")
        upload(browser, "inpaint-mask", tmp_path / "mask.png")
        inpainted = generate_until(browser, "inpaint", 3, [
            f"seed {s} · CFG 7.5 · dpm++2m, 4 steps · 16×16 · inpainting, strength 1" for s in (3, 4)])
    except Exception:
        browser.save_screenshot(str(tmp_path / "failed.png"))
        raise
    chosen, _ = fetch_pixels(results[1])
    assert np.array_equal(fetch_pixels(sent)[0][..., :3], chosen)  # the second result, as clicked
    # Generating there is img2img from that image: the image `difflab sample --image` makes from it.
    Image.fromarray(chosen).save(tmp_path / "chosen.png")
    expected = cli_images(tmp_path, "img2img", "--model", files["base"], "--image", tmp_path / "chosen.png",
                          "--strength", 0.5, seed=3, count=1)[0]
    made, settings = fetch_pixels(img2img[0])
    assert settings["mode"] == "img2img" and settings["strength"] == 0.5
    assert np.array_equal(made, expected)
    assert not np.array_equal(made, chosen)
    # The inpainting tab got the second img2img result as its image: inpainting ran from it with the mask.
    second = fetch_pixels(img2img[1])[0]
    first, settings = fetch_pixels(inpainted[0])
    assert settings["mode"] == "inpaint" and first.shape == (16, 16, 3)
    kept = np.abs(first[:, :6].astype(float) - second[:, :6]).mean()
    repainted = np.abs(first[:, 10:].astype(float) - second[:, 10:]).mean()
    print(f"inpainting the sent image, mean |difference| to it: kept half {kept:.1f}, repainted half {repainted:.1f}")
    assert repainted > kept


@needs_chromium
def test_lora_picker_differs_from_the_base_and_equals_the_cli(served, files, browser, tmp_path):
    open_page(browser, served)
    type_into(browser, "#prompt textarea", PROMPT)
    set_number(browser, "steps", SAME["steps"])
    set_number(browser, "count", 2)
    base_captions = [f"seed {s} · CFG 7.5 · dpm++2m, 4 steps · 16×16" for s in (5, 6)]
    try:
        choose(browser, "lora", "lora-run")
        set_number(browser, "lora-scale", 0.8)
        with_lora = generate_until(browser, "txt2img", 5, [f"{c} · LoRA lora-run ×0.8" for c in base_captions])
        keep_screenshot(browser, tmp_path, "demo_text_lora.png")
        choose(browser, "lora", "none")
        without = generate_until(browser, "txt2img", 5, base_captions)
    except Exception:
        browser.save_screenshot(str(tmp_path / "failed.png"))
        raise
    made = [fetch_pixels(url) for url in with_lora]
    assert made[0][1]["lora"] == [str(files["a"])] and made[0][1]["lora_scale"] == [0.8]  # as the CLI records
    expected = cli_images(tmp_path, "lora", "--model", files["base"], "--lora", files["a"], "--lora-scale", 0.8,
                          seed=5, count=2)
    for (pixels, _), cli in zip(made, expected):
        assert np.array_equal(pixels, cli)
    base = [fetch_pixels(url)[0] for url in without]
    assert all(not np.array_equal(a, b) for (a, _), b in zip(made, base))
    assert np.array_equal(base[0], cli_images(tmp_path, "base", "--model", files["base"], seed=5, count=1)[0])
