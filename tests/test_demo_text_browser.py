"""The demo of a text-to-image model (a tiny random Stable Diffusion folder) served on 127.0.0.1 and used
as a person would, in headless Chromium: a prompt and a seed, img2img at two strengths, inpainting with a
mask painted in Gradio's image editor, bad requests; and a burst of concurrent API clients.

What "closer to the input" means for a random tiny model: its VAE is random too, so even a perfect
img2img or inpainting cannot give the input back — the VAE's round trip of the input (encode with the
image's own seed, as generate does, then decode) is the nearest a latent model gets. The tests measure
against both the input and that reconstruction. Set DIFFLAB_SCREENSHOTS=DIR to keep the screenshots
(docs/images/ holds the ones the docs show).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tiny_sd
from difflab.app.service import Limits
from helpers.web import fetch_pixels, free_port, needs_chromium, set_number

SIZE = 32  # the input images' size (the tiny model's default is 16; the page's sliders go to 64)
BURST = 20
QUEUE = 6  # the served demo's queue: a burst of BURST fills it


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    return tiny_sd.build(tmp_path_factory.mktemp("sd") / "tiny-sd", "text")


@pytest.fixture(scope="module")
def served(text_model, tmp_path_factory):
    """The demo of the tiny text model, on a free loopback port; its URL."""
    from difflab.app import build_demo, launch

    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    demo = build_demo(text_model, limits=Limits(max_steps=20, max_images=4, max_image_size=64, max_queue=QUEUE))
    port = free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    """A 32×32 picture with structure: colour ramps and a checkerboard."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    pixels = np.stack([xx * 255 / SIZE, yy * 255 / SIZE, ((xx // 8 + yy // 8) % 2) * 255], -1).astype(np.uint8)
    path = tmp_path_factory.mktemp("inputs") / "picture.png"
    Image.fromarray(pixels).save(path)
    return path


def reconstruction(model_folder: Path, picture: Path, seed: int) -> np.ndarray:
    """The VAE's round trip of the picture, with the posterior sample generate draws for image `seed`."""
    import torch

    from difflab.seeds import image_generators
    from difflab.storage.folder import load_model

    model = load_model(model_folder)
    x = torch.from_numpy(np.asarray(Image.open(picture).convert("RGB"), dtype=np.float32) / 127.5 - 1)
    with torch.no_grad():
        out = model.codec.decode(model.codec.encode(x.permute(2, 0, 1)[None], image_generators(seed, 1)))
    return ((out[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).numpy()


def keep_screenshot(driver, tmp_path: Path, name: str) -> None:
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.3)
    driver.save_screenshot(str(tmp_path / name))
    if os.environ.get("DIFFLAB_SCREENSHOTS"):
        folder = Path(os.environ["DIFFLAB_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, folder / name)


def open_page(driver, url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 90).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#prompt textarea")
                                    and "Loading..." not in d.find_element(By.TAG_NAME, "body").text)


def type_into(driver, selector: str, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.CSS_SELECTOR, selector)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    if text:
        field.send_keys(text)
    field.send_keys(Keys.TAB)


def number_in(driver, elem_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]").get_attribute("value")


def open_tab(driver, mode: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, f"tab-{mode}-button").click()


def upload(driver, elem_id: str, path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys(str(path))
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#{elem_id} img"))
    time.sleep(0.5)


def upload_to_editor(driver, elem_id: str, path: Path) -> None:
    """Upload a background into Gradio's image editor; wait until it is shown (the zoom fits it)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    zoom = f"#{elem_id} .zoom-number span"
    before = WebDriverWait(driver, 30).until(lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, zoom)
                                                        if e.text])[0]
    driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys(str(path))
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, zoom).text != before)
    time.sleep(1)


def generate(driver, mode: str, seed: int, expect: str) -> list[str]:
    """Set the seed, click the tab's Generate; the gallery's image URLs once its captions show `expect`
    for this seed and the images are loaded (URLs name files by content: the same image, the same URL)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    set_number(driver, "seed", seed)
    driver.find_element(By.ID, f"generate-{mode}").click()

    def shown(d):
        toasts = [t.text for t in d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]") if t.text.strip()]
        if toasts:
            raise AssertionError(f"no images for seed {seed} ({expect!r}): the page says {toasts}")
        gallery = d.find_element(By.ID, "gallery")
        images = gallery.find_elements(By.CSS_SELECTOR, "img")
        loaded = images and all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                                for i in images)
        captions = [line for line in gallery.text.splitlines() if line.startswith(f"seed {seed} ·")]
        if not captions or expect not in captions[0] or not loaded:
            return False
        return list(dict.fromkeys(i.get_attribute("src") for i in images))

    return WebDriverWait(driver, 120, poll_frequency=0.3).until(shown)


def error_message(driver, screenshot=None) -> str:
    """The text of the error the page shows (then closes it); `screenshot()` is called while it shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    text = WebDriverWait(driver, 60).until(lambda d: [t.text for t in d.find_elements(
        By.CSS_SELECTOR, "[data-testid=toast-text]") if t.text.strip()])
    if screenshot is not None:
        screenshot()
    for close in driver.find_elements(By.CSS_SELECTOR, "[data-testid=toast-close]"):
        try:
            close.click()
        except Exception:  # already fading out
            pass
    WebDriverWait(driver, 20).until(lambda d: not d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-text]"))
    return text[-1]


def paint_right_half(driver, elem_id: str) -> None:
    """One zigzag brush stroke, down and up columns one pixel apart, over the right half of the picture in
    Gradio's image editor (the editor takes about half a second to finish each stroke: one per column took 9 s)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    zoom = float(driver.find_element(By.CSS_SELECTOR, f"#{elem_id} .zoom-number span").text.rstrip("%")) / 100
    canvas = driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} canvas")[-1]  # the picture is centred in it
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    columns = [int((x - SIZE / 2) * zoom) for x in np.arange(SIZE / 2 + 1, SIZE, 1.0)]  # inside the picture
    top, bottom = int((0.5 - SIZE / 2) * zoom), int((SIZE / 2 - 0.5) * zoom)
    stroke = ActionChains(driver, duration=20).move_to_element_with_offset(canvas, columns[0], top).click_and_hold()
    for i, x in enumerate(columns):
        if i:
            stroke.move_by_offset(x - columns[i - 1], 0)  # along the top or bottom edge to the next column
        stroke.move_by_offset(0, bottom - top if i % 2 == 0 else top - bottom)
    stroke.release().perform()


@needs_chromium
def test_prompt_seed_and_same_image_twice(served, browser, tmp_path):
    from selenium.webdriver.common.by import By

    open_page(browser, served)
    assert [t.text for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]")] == [
        "Text to image", "Image to image", "Inpainting"]  # a plain text model: no depth or upscaling tab
    type_into(browser, "#prompt textarea", "a red fox in the snow")
    type_into(browser, "#negative-prompt textarea", "blurry")
    set_number(browser, "steps", 4)
    set_number(browser, "count", 2)
    try:
        first = generate(browser, "txt2img", 1234, "dpm++2m, 4 steps")
        keep_screenshot(browser, tmp_path, "demo_text.png")
        other = generate(browser, "txt2img", 99, "dpm++2m, 4 steps")
        again = generate(browser, "txt2img", 1234, "dpm++2m, 4 steps")
    except Exception:
        browser.save_screenshot(str(tmp_path / "failed.png"))
        raise
    assert len(first) == len(other) == len(again) == 2
    page = browser.find_element(By.ID, "gallery").text
    assert "seed 1234 · CFG 7.5 · dpm++2m, 4 steps · 16×16" in page, page
    (a, settings), (b, _) = fetch_pixels(first[0]), fetch_pixels(again[0])
    assert settings == {"model": "tiny-sd", "prompt": "a red fox in the snow", "negative_prompt": "blurry",
                        "sampler": "dpm++2m", "steps": 4, "cfg_scale": 7.5, "seed": 1234, "width": 16, "height": 16}
    assert a.shape == (16, 16, 3) and np.array_equal(a, b)  # same seed, same image
    assert not np.array_equal(a, fetch_pixels(other[0])[0])
    assert not np.array_equal(a, fetch_pixels(first[1])[0])  # image i uses seed + i

    import io
    import urllib.request

    with urllib.request.urlopen(first[0], timeout=30) as response:
        parameters = Image.open(io.BytesIO(response.read())).info["parameters"]
    assert parameters == ("a red fox in the snow\nNegative prompt: blurry\nSteps: 4, Sampler: dpm++2m, CFG scale: 7.5, "
                          "Seed: 1234, Size: 16x16, Model: tiny-sd")  # AUTOMATIC1111's text


@needs_chromium
def test_bad_requests_show_one_line(served, browser, tmp_path):
    """An empty prompt and a width the VAE cannot take: one line in the page. Steps over the limit cannot be
    asked for in the page (the slider stops at the limit); through the API they get one line too (Gradio's
    own check of the slider)."""
    from gradio_client import Client
    from selenium.webdriver.common.by import By

    open_page(browser, served)
    type_into(browser, "#prompt textarea", "")
    set_number(browser, "steps", 2)
    set_number(browser, "count", 1)
    set_number(browser, "seed", 5)
    messages = []
    try:
        browser.find_element(By.ID, "generate-txt2img").click()
        messages.append(error_message(browser))  # an empty prompt
        type_into(browser, "#prompt textarea", "a fox")
        set_number(browser, "width", 17)
        browser.find_element(By.ID, "generate-txt2img").click()
        messages.append(error_message(browser, lambda: keep_screenshot(browser, tmp_path, "demo_text_error.png")))
        set_number(browser, "steps", 500)
        steps = browser.find_element(By.CSS_SELECTOR, "#steps input[type=number]").get_attribute("value")
    except Exception:
        browser.save_screenshot(str(tmp_path / "failed.png"))
        raise
    assert messages[0] == "write a prompt: this is a text-to-image model, it draws what the prompt describes"
    assert messages[1] == ("the image size 17×16 does not fit: the width 17 must be a multiple of 2 (the VAE's "
                           "downscaling factor); nearest that work: 16 or 18"), messages
    assert steps == "20"
    with pytest.raises(Exception, match="Value 500 is greater than maximum value 20") as caught:  # Gradio checks it
        Client(served, verbose=False, download_files=False).predict(
            "a fox", "", "ddim", 500, 5, 1, 16, 16, 7.5, "#ff0000", 0, 0, api_name="/txt2img")
    messages.append(str(caught.value))
    print(messages)
    assert all("\n" not in m and "Traceback" not in m for m in messages)


@pytest.mark.slow
@needs_chromium
def test_img2img_strength_and_inpainting(served, browser, text_model, picture, tmp_path):
    """img2img at strength 0.3 stays closer to the input than at 0.9; inpainting a mask painted over the
    right half changes the right half more than the left."""
    from selenium.webdriver.support.ui import WebDriverWait

    open_page(browser, served)
    type_into(browser, "#prompt textarea", "a fox")
    set_number(browser, "steps", 10)
    set_number(browser, "count", 1)
    set_number(browser, "width", SIZE)
    set_number(browser, "height", SIZE)
    seed = 7
    source = np.asarray(Image.open(picture).convert("RGB"), dtype=float)
    rebuilt = reconstruction(text_model, picture, seed)
    try:
        open_tab(browser, "img2img")
        set_number(browser, "width", 16)
        upload(browser, "img2img-image", picture)
        WebDriverWait(browser, 30).until(lambda d: number_in(d, "width") == str(SIZE))  # follows the upload
        assert number_in(browser, "height") == str(SIZE)
        out = {}
        for strength in (0.3, 0.9):
            set_number(browser, "img2img-strength", strength)
            (url,) = generate(browser, "img2img", seed, f"image to image, strength {strength:g}")
            out[strength], settings = fetch_pixels(url)
            assert settings["mode"] == "img2img" and settings["strength"] == strength
            assert out[strength].shape == (SIZE, SIZE, 3)
        open_tab(browser, "inpaint")
        upload_to_editor(browser, "inpaint-editor", picture)
        paint_right_half(browser, "inpaint-editor")
        (url,) = generate(browser, "inpaint", seed, "inpainting, strength 1")
        keep_screenshot(browser, tmp_path, "demo_text_inpaint.png")
        inpainted, settings = fetch_pixels(url)
    except Exception:
        browser.save_screenshot(str(tmp_path / "failed.png"))
        raise

    def distance(image, reference, columns=slice(None)):
        return float(np.abs(image.astype(float) - reference)[:, columns].mean())

    to_input = {s: distance(o, source) for s, o in out.items()}
    to_rebuilt = {s: distance(o, rebuilt) for s, o in out.items()}
    print(f"img2img, mean |difference| (0-255): to the input {to_input}, to the VAE's reconstruction {to_rebuilt}")
    assert to_input[0.3] < to_input[0.9]
    assert to_rebuilt[0.3] < to_rebuilt[0.9] - 3

    assert settings["mode"] == "inpaint"
    kept, repainted = slice(0, SIZE // 2 - 2), slice(SIZE // 2 + 2, SIZE)  # a margin on either side of the edge
    figures = {name: (distance(inpainted, reference, kept), distance(inpainted, reference, repainted))
               for name, reference in (("input", source), ("reconstruction", rebuilt))}
    print(f"inpainting, mean |difference| (kept half, repainted half): {figures}")
    assert figures["input"][1] > figures["input"][0]
    assert figures["reconstruction"][1] > 1.5 * figures["reconstruction"][0]


def test_burst_of_concurrent_requests_answered_or_turned_away(served):
    """BURST clients submit at the same moment to a demo whose queue holds QUEUE: each request is answered
    with its images or turned away with the queue-full message; none is lost."""
    from gradio_client import Client

    clients = [Client(served, verbose=False, download_files=False) for _ in range(BURST)]
    start = threading.Barrier(BURST)

    def one(seed: int):
        start.wait()
        try:
            return clients[seed].predict("a fox", "", "ddim", 20, seed, 4, 64, 64, 7.5, "#ff0000", 0, 0,
                                         api_name="/txt2img")
        except Exception as e:  # gradio_client raises the server's message
            return e

    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=BURST) as pool:
        results = list(pool.map(one, range(BURST), timeout=300))
    answered = turned_away = 0
    for seed, result in enumerate(results):
        if isinstance(result, Exception):
            assert "queue is full" in str(result).lower(), repr(result)
            turned_away += 1
        else:
            gallery, files = result
            assert len(gallery) == len(files) == 4
            assert [g["caption"].split(" · ")[0] for g in gallery] == [f"seed {seed + i}" for i in range(4)]
            answered += 1
    print(f"{BURST} requests in {time.monotonic() - began:.1f} s: {answered} answered, {turned_away} queue full")
    assert answered + turned_away == BURST and answered >= 1


def test_api_inpainting_with_an_uploaded_mask(served, picture, tmp_path):
    """API clients inpaint too: the editor's value is a dict (background, layers, composite); the mask may
    come as its own file."""
    from gradio_client import Client, handle_file

    mask = Image.new("L", (SIZE, SIZE))
    mask.paste(255, (SIZE // 2, 0, SIZE, SIZE))
    mask.save(tmp_path / "mask.png")
    client = Client(served, verbose=False, download_files=False)
    editor = {"background": handle_file(str(picture)), "layers": [], "composite": None}
    gallery, files = client.predict("a fox", "", "ddim", 4, 3, 1, SIZE, SIZE, 7.5, "#ff0000", 0, 0, editor,
                                    handle_file(str(tmp_path / "mask.png")), 1.0, api_name="/inpaint")
    assert gallery[0]["caption"] == f"seed 3 · CFG 7.5 · ddim, 4 steps · {SIZE}×{SIZE} · inpainting, strength 1"
