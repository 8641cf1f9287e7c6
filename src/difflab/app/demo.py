"""The Gradio page in front of `difflab.app.service`: one model, its controls, a gallery.

Pixel models get one form (sampler, steps, seed, count, class and CFG, guidance); text-to-image models
a prompt, a negative prompt, CFG scale and size, a LoRA picker (the LoRAs the demo was started with, and
a weight), and a tab per mode the model takes (text to image, image to image, inpainting with an image
editor to paint the mask, depth to image, upscaling). "Send to img2img" / "Send to inpainting" under the
results put the chosen image into that tab.

`build_demo(model)` returns a `gr.Blocks` with its queue set up (one request samples at a time, at
most `limits.max_queue` wait), so `build_demo("model").launch()` is a whole app.
"""

from __future__ import annotations

from pathlib import Path

from difflab.app.guides import Guides
from difflab.app.loras import LoraMenu
from difflab.app.service import (
    MAX_CFG_SCALE,
    MAX_LORA_SCALE,
    MAX_SEED,
    Generator,
    Limits,
    Request,
    check_model,
    fit_size,
    largest_side,
    modes_of,
)
from difflab.diffusion.request import (
    DEFAULT_INPAINT_STRENGTH,
    DEFAULT_NOISE_LEVEL,
    DEFAULT_STRENGTH,
    FALLBACK_MAX_NOISE_LEVEL,
)
from difflab.diffusion.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS
from difflab.errors import DifflabError
from difflab.models.embeddings import learned_tokens
from difflab.models.model import DEFAULT_CFG_SCALE

RANDOM_SEED_JS = f"() => Math.floor(Math.random() * {MAX_SEED + 1})"  # in the page: no round trip
# small images stay sharp when enlarged; an input image (uploaded or sent from the results) is shown at a size one sees
CSS = ("#gallery img { image-rendering: pixelated; }\n"
       ".input-image img { image-rendering: pixelated; width: 160px !important; height: 160px !important; "
       "object-fit: contain !important; }")


def build_demo(model_spec: str | Path, *, clip_model: str | None = None, limits: Limits | None = None,
               device="auto", allow_pickle: bool = False, title: str | None = None, loras=(), embeddings=()):
    """The page for `model_spec`; `loras` (files, folders or run folders) are offered in its LoRA picker;
    `embeddings`, textual inversion files (`FILE[:TOKEN]`), are loaded onto the model and their tokens listed
    under the prompt."""
    from difflab.devices import pick_device
    from difflab.storage.folder import load_model

    limits = limits or Limits()
    menu = LoraMenu(loras, allow_pickle=allow_pickle)  # every LoRA found before the model loads
    device = pick_device(device) if isinstance(device, str) else device
    model = load_model(model_spec, allow_pickle=allow_pickle, device=device)
    check_model(model, limits, model_spec)
    if menu:
        menu.load(model)  # a pixel model, or a LoRA made for another base, is refused here
    if embeddings:
        from difflab.models.embeddings import load_embeddings

        load_embeddings(model, embeddings, allow_pickle=allow_pickle)
    guides = Guides(clip_model, device=device)
    name = model_label(model_spec)
    generator = Generator(model, name, limits, guides, loras=menu)
    title = title or f"difflab · {name}"
    if model.prompts is not None:
        demo = text_page(model, generator, guides, limits, title, menu)
    else:
        demo = pixel_page(model, generator, guides, limits, title)
    demo.queue(default_concurrency_limit=1, max_size=limits.max_queue)
    return demo


def answer(generator: Generator, request: Request):
    """The gallery's (PNG, caption) pairs and the PNGs to download; a refused request is a one-line message."""
    import gradio as gr

    try:
        results = generator(request, progress=True)
    except DifflabError as e:
        raise gr.Error(str(e), print_exception=False) from None
    return [(str(path), text) for path, text in results], [str(path) for path, _ in results]


def cfg_controls(model, visible: bool = True):
    """The guidance interval (noise levels where CFG acts) and rescale, at the model's defaults (diffusion/cfg.py)."""
    import gradio as gr

    from difflab.app.fields import slider
    from difflab.diffusion.cfg import guidance_of

    default = guidance_of(model)
    interval = gr.Textbox(default.settings().get("cfg_interval", ""), max_lines=1, visible=visible,
                          label="CFG only at noise levels LOW-HIGH (sigma, e.g. 0.3-5; empty: every step)",
                          elem_id="cfg-interval")
    rescale = slider(0, 1, value=default.rescale, step=0.05, visible=visible, elem_id="cfg-rescale",
                     label="CFG rescale (0 = none; 0.7 keeps strong guidance from over-saturating)")
    return interval, rescale


def pixel_page(model, generator: Generator, guides: Guides, limits: Limits, title: str):
    """Unconditional and class-conditional pixel models: sampler, steps, seed, count, class and CFG, guidance."""
    import gradio as gr

    from difflab.app.fields import slider

    classes = model.class_names or []

    def on_generate(sampler, steps, seed, count, class_name, cfg_scale, color, color_scale, prompt, clip_scale,
                    cfg_interval="", cfg_rescale=None, progress=gr.Progress(track_tqdm=True)):
        return answer(generator, Request(sampler=sampler, steps=steps, seed=seed, count=count,
                                         class_name=class_name or None, cfg_scale=cfg_scale, color=color,
                                         color_scale=color_scale, prompt=prompt, clip_scale=clip_scale,
                                         cfg_interval=cfg_interval, cfg_rescale=cfg_rescale))

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        gr.HTML(f"<style>{CSS}</style>", padding=False)
        gr.Markdown(f"## {title}\n{describe(model)}")
        with gr.Row():
            with gr.Column(scale=1):
                sampler, steps, seed, randomize, count = sampling_controls(limits)
                class_name = gr.Dropdown(classes, value=classes[0] if classes else None, label="Class",
                                         visible=bool(classes), elem_id="class")
                cfg_scale = slider(0, MAX_CFG_SCALE, value=DEFAULT_CFG_SCALE, step=0.1,
                                      label="Classifier-free guidance scale (1 = plain conditional)",
                                      visible=bool(classes), elem_id="cfg-scale")
                cfg_interval, cfg_rescale = cfg_controls(model, visible=bool(classes))
                color, color_scale = colour_controls(guides)
                with gr.Group(visible=guides.clip is not None):
                    prompt = gr.Textbox("", label="CLIP guidance: prompt", elem_id="prompt", max_lines=1)
                    clip_scale = clip_control(guides)
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                gallery, files = outputs()
        gr.Markdown(f"Limits: at most {limits.max_steps} steps and {limits.max_images} images a request; "
                    "requests queue and run one at a time.")
        randomize.click(None, outputs=seed, js=RANDOM_SEED_JS)
        run.click(on_generate, inputs=[sampler, steps, seed, count, class_name, cfg_scale, color, color_scale,
                                       prompt, clip_scale, cfg_interval, cfg_rescale],
                  outputs=[gallery, files], api_name="generate", concurrency_limit=1)
    return demo


def text_page(model, generator: Generator, guides: Guides, limits: Limits, title: str, loras: LoraMenu):
    """Text-to-image models (the Stable Diffusion family): prompt, negative prompt, LoRA, CFG scale, size, and a
    tab per mode the model takes, each with its own Generate button and API endpoint (/txt2img, /img2img,
    /inpaint, /depth, /upscale); every endpoint takes the LoRA and its weight, then the guidance interval and
    rescale last (all optional)."""
    import gradio as gr

    from difflab.app.fields import image_editor, slider

    modes = modes_of(model)
    factor, largest = model.size_factor, largest_side(model, limits)
    size = min(model.info.image_size, largest)

    def request(prompt, negative_prompt, sampler, steps, seed, count, width, height, cfg_scale, color, color_scale,
                clip_scale, lora, lora_scale, **inputs) -> Request:
        return Request(prompt=prompt, negative_prompt=negative_prompt, sampler=sampler, steps=steps, seed=seed,
                       count=count, width=width, height=height, cfg_scale=cfg_scale, color=color,
                       color_scale=color_scale, clip_scale=clip_scale, lora=lora, lora_scale=lora_scale, **inputs)

    # One handler per tab: the shared settings, the tab's own inputs, then the LoRA and its weight (last, so that
    # API clients that do not name them get no LoRA).
    def txt2img(prompt, negative_prompt, sampler, steps, seed, count, width, height, cfg_scale, color, color_scale,
                clip_scale, lora="", lora_scale=1.0, cfg_interval="", cfg_rescale=None,
                progress=gr.Progress(track_tqdm=True)):
        return answer(generator, request(prompt, negative_prompt, sampler, steps, seed, count, width, height,
                                         cfg_scale, color, color_scale, clip_scale, lora, lora_scale,
                                         cfg_interval=cfg_interval, cfg_rescale=cfg_rescale))

    def img2img(prompt, negative_prompt, sampler, steps, seed, count, width, height, cfg_scale, color, color_scale,
                clip_scale, image, strength, lora="", lora_scale=1.0, cfg_interval="", cfg_rescale=None,
                progress=gr.Progress(track_tqdm=True)):
        return answer(generator, request(prompt, negative_prompt, sampler, steps, seed, count, width, height,
                                         cfg_scale, color, color_scale, clip_scale, lora, lora_scale,
                                         cfg_interval=cfg_interval, cfg_rescale=cfg_rescale, mode="img2img",
                                         image=image, strength=strength))

    def inpaint(prompt, negative_prompt, sampler, steps, seed, count, width, height, cfg_scale, color, color_scale,
                clip_scale, editor, mask, strength, lora="", lora_scale=1.0, cfg_interval="", cfg_rescale=None,
                progress=gr.Progress(track_tqdm=True)):
        try:
            image, mask = inpaint_inputs(editor, mask)
        except DifflabError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return answer(generator, request(prompt, negative_prompt, sampler, steps, seed, count, width, height,
                                         cfg_scale, color, color_scale, clip_scale, lora, lora_scale,
                                         cfg_interval=cfg_interval, cfg_rescale=cfg_rescale, mode="inpaint",
                                         image=image, mask=mask, strength=strength))

    def depth(prompt, negative_prompt, sampler, steps, seed, count, width, height, cfg_scale, color, color_scale,
              clip_scale, image, depth_map, strength, lora="", lora_scale=1.0, cfg_interval="", cfg_rescale=None,
              progress=gr.Progress(track_tqdm=True)):
        return answer(generator, request(prompt, negative_prompt, sampler, steps, seed, count, width, height,
                                         cfg_scale, color, color_scale, clip_scale, lora, lora_scale,
                                         cfg_interval=cfg_interval, cfg_rescale=cfg_rescale, mode="depth",
                                         image=image, depth=depth_map, strength=strength))

    def upscale(prompt, negative_prompt, sampler, steps, seed, count, cfg_scale, color, color_scale, clip_scale,
                image, noise_level, lora="", lora_scale=1.0, cfg_interval="", cfg_rescale=None,
                progress=gr.Progress(track_tqdm=True)):
        return answer(generator, request(prompt, negative_prompt, sampler, steps, seed, count, None, None,
                                         cfg_scale, color, color_scale, clip_scale, lora, lora_scale,
                                         cfg_interval=cfg_interval, cfg_rescale=cfg_rescale, mode="upscale",
                                         image=image, noise_level=noise_level))

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        gr.HTML(f"<style>{CSS}</style>", padding=False)
        gr.Markdown(f"## {title}\n{describe(model)}")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox("", label="Prompt", placeholder="what to draw", lines=2, elem_id="prompt")
                tokens = learned_tokens(model.prompts.tokenizer)
                if tokens:
                    gr.Markdown("Textual inversion tokens: " + ", ".join(f"`{t}`" for t in tokens),
                                elem_id="embedding-tokens")
                negative = gr.Textbox("", label="Negative prompt", placeholder="what to steer away from (optional)",
                                      lines=1, elem_id="negative-prompt")
                lora, lora_scale = lora_controls(loras)
                buttons = {}
                with gr.Tabs(elem_id="modes") as tabs:
                    if "txt2img" in modes:
                        with gr.Tab("Text to image", id="txt2img", elem_id="tab-txt2img"):
                            buttons["txt2img"] = generate_button("txt2img")
                    if "img2img" in modes:
                        with gr.Tab("Image to image", id="img2img", elem_id="tab-img2img"):
                            img2img_image = image_input("Start from this image", "img2img-image")
                            img2img_strength = strength_slider(DEFAULT_STRENGTH, "img2img-strength")
                            buttons["img2img"] = generate_button("img2img")
                    if "inpaint" in modes:
                        with gr.Tab("Inpainting", id="inpaint", elem_id="tab-inpaint"):
                            editor = image_editor(
                                label="Upload an image, then paint over what to repaint", type="pil",
                                image_mode="RGBA", sources=("upload", "clipboard"), format="png",
                                transforms=(), layers=False, eraser=gr.Eraser(),
                                brush=gr.Brush(default_size=max(1, model.info.image_size // 20), colors=["#ffffff"],
                                               color_mode="fixed"), elem_id="inpaint-editor")
                            inpaint_mask = image_input("…or upload a mask (white = repaint)", "inpaint-mask")
                            inpaint_strength = strength_slider(DEFAULT_INPAINT_STRENGTH, "inpaint-strength")
                            buttons["inpaint"] = generate_button("inpaint")
                    if "depth" in modes:
                        with gr.Tab("Depth to image", id="depth", elem_id="tab-depth"):
                            depth_image = image_input("Start from this image", "depth-image")
                            depth_map = image_input("Depth map (optional: nearer is brighter; else the model "
                                                    "estimates it)", "depth-map")
                            depth_strength = strength_slider(DEFAULT_STRENGTH, "depth-strength")
                            buttons["depth"] = generate_button("depth")
                    if "upscale" in modes:
                        with gr.Tab("Upscaling", id="upscale", elem_id="tab-upscale"):
                            upscale_image = image_input(f"Low-resolution image (at most {largest // 4} pixels a "
                                                        "side; the result is 4× larger)", "upscale-image")
                            highest = model.max_noise_level
                            highest = FALLBACK_MAX_NOISE_LEVEL if highest is None else highest
                            noise_level = slider(0, highest, value=min(DEFAULT_NOISE_LEVEL, highest), step=1,
                                                    label="Noise level (added to the input; more lets the model "
                                                          "invent more detail)", elem_id="noise-level")
                            buttons["upscale"] = generate_button("upscale")
                cfg_scale = slider(0, MAX_CFG_SCALE, value=model.default_cfg_scale, step=0.5,
                                      label="CFG scale (how closely to follow the prompt; 1 = plain conditional)",
                                      elem_id="cfg-scale")
                cfg_interval, cfg_rescale = cfg_controls(model)
                sampler, steps, seed, randomize, count = sampling_controls(limits)
                with gr.Row(visible="upscale" not in modes):
                    width = slider(factor, largest, value=size, step=factor, label="Width", elem_id="width")
                    height = slider(factor, largest, value=size, step=factor, label="Height", elem_id="height")
                color, color_scale = colour_controls(guides)
                with gr.Group(visible=guides.clip is not None):
                    clip_scale = clip_control(guides, "CLIP guidance towards the prompt: scale")
            with gr.Column(scale=2):
                gallery, send, files = outputs(lambda: send_buttons(modes))
                chosen = gr.State(None)  # the index of the image clicked in the gallery
        gr.Markdown(f"Limits: at most {limits.max_steps} steps, {limits.max_images} images and {largest} pixels "
                    "a side a request; requests queue and run one at a time. The PNGs carry the prompt and "
                    "settings (AUTOMATIC1111's `parameters` text, and JSON in a `difflab` chunk).")
        randomize.click(None, outputs=seed, js=RANDOM_SEED_JS)
        shared = [prompt, negative, sampler, steps, seed, count, width, height, cfg_scale, color, color_scale,
                  clip_scale]
        handlers = {
            "txt2img": (txt2img, lambda: []),
            "img2img": (img2img, lambda: [img2img_image, img2img_strength]),
            "inpaint": (inpaint, lambda: [editor, inpaint_mask, inpaint_strength]),
            "depth": (depth, lambda: [depth_image, depth_map, depth_strength]),
            "upscale": (upscale, lambda: [upscale_image, noise_level]),
        }
        for mode, button in buttons.items():
            fn, extra = handlers[mode]
            inputs = [c for c in shared if mode != "upscale" or c not in (width, height)] + extra() + [lora, lora_scale]
            inputs += [cfg_interval, cfg_rescale]  # after the LoRA: API clients that do not name them get the defaults
            # one queue for every tab: the model (and the LoRA chosen on it) serves one request at a time
            button.click(fn, inputs=inputs, outputs=[gallery, files], api_name=mode, concurrency_limit=1,
                         concurrency_id="generate")

        def size_of(image):
            """Width and height follow an uploaded image (its shape kept, within the limit)."""
            if isinstance(image, dict):  # the image editor's value
                image = image.get("background")
            if image is None:
                return gr.update(), gr.update()
            try:
                from difflab.diffusion.inputs import read_image

                return fit_size(*read_image(image, "image").size, factor, largest)
            except DifflabError:
                return gr.update(), gr.update()  # the request will say what is wrong with it

        uploads = [img2img_image if "img2img" in modes else None, editor if "inpaint" in modes else None,
                   depth_image if "depth" in modes else None]
        for component in uploads:
            if component is not None:
                component.upload(size_of, inputs=component, outputs=[width, height], queue=False,
                                 api_visibility="private")

        def choose(event):
            return event.index

        choose.__annotations__["event"] = gr.SelectData  # a real class (this module's annotations are strings)

        def send_to(mode):
            def sent(results, index):
                """The chosen result (the first, if none was clicked) as the tab's input; the tab opened."""
                image = chosen_result(results, index)
                value = image if mode == "img2img" else {"background": image, "layers": [], "composite": image}
                return value, gr.Tabs(selected=mode), *size_of(image)
            return sent

        gallery.select(choose, outputs=chosen, queue=False, api_visibility="private")
        # new results keep the preview's selection (the page shows the same place chosen); closing it chooses none
        gallery.preview_close(lambda: None, outputs=chosen, queue=False, api_visibility="private")
        targets = {"img2img": img2img_image if "img2img" in modes else None,
                   "inpaint": editor if "inpaint" in modes else None}
        for mode, button in send.items():
            button.click(send_to(mode), inputs=[gallery, chosen], outputs=[targets[mode], tabs, width, height],
                         queue=False, api_visibility="private")
    return demo


def send_buttons(modes) -> dict:
    """{mode: button} of "Send to img2img" / "Send to inpainting", for the tabs the model has."""
    import gradio as gr

    with gr.Row():
        return {mode: gr.Button(f"Send to {name}", size="sm", elem_id=f"send-{mode}")
                for mode, name in (("img2img", "img2img"), ("inpaint", "inpainting")) if mode in modes}


def chosen_result(results, index) -> str:
    """The path of result `index` of the gallery's value (a list of (image, caption)); the first for None."""
    import gradio as gr

    if not results:
        raise gr.Error("nothing to send yet: generate an image first", print_exception=False)
    item = results[index if isinstance(index, int) and 0 <= index < len(results) else 0]
    image = item[0] if isinstance(item, (tuple, list)) else item
    return str(getattr(image, "path", image))


def lora_controls(loras: LoraMenu):
    """The LoRA picker: none (the base model) or one of the LoRAs the demo was started with, and its weight."""
    import gradio as gr

    from difflab.app.fields import slider

    with gr.Row(visible=bool(loras), elem_id="lora-row"):
        lora = gr.Dropdown([("none", "")] + [(label, label) for label in loras.labels], value="", label="LoRA",
                           elem_id="lora", scale=2)
        scale = slider(0, MAX_LORA_SCALE, value=1.0, step=0.05, label="LoRA weight (1 = as trained)",
                       elem_id="lora-scale", scale=3)
    return lora, scale


def sampling_controls(limits: Limits):
    import gradio as gr

    from difflab.app.fields import number, slider

    sampler = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler", elem_id="sampler")
    steps = slider(1, limits.max_steps, value=min(DEFAULT_STEPS, limits.max_steps), step=1,
                      label="Steps", elem_id="steps")
    with gr.Row(equal_height=True):
        seed = number(0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", elem_id="seed", scale=3)
        randomize = gr.Button("Random seed", elem_id="random-seed", scale=1)
    count = slider(1, limits.max_images, value=min(4, limits.max_images), step=1,
                      label="Number of images", elem_id="count")
    return sampler, steps, seed, randomize, count


def colour_controls(guides: Guides):
    import gradio as gr

    from difflab.app.fields import slider

    with gr.Group():
        color = gr.ColorPicker("#ff0000", label="Colour guidance: colour", elem_id="color")
        color_scale = slider(0, guides.max_color_scale, value=0, step=1,
                                label=f"Colour guidance scale (0 = off; {guides.default_color_scale:g} "
                                      "is a good start)", elem_id="color-scale")
    return color, color_scale


def clip_control(guides: Guides, label: str = "CLIP guidance scale"):
    from difflab.app.fields import slider

    return slider(0, guides.max_clip_scale or 1, value=0, step=0.5,
                  label=f"{label} (0 = off; {guides.default_clip_scale:g} is a good start)", elem_id="clip-scale")


def outputs(between=None):
    """The gallery and the PNGs to download; `between()` makes what goes between them."""
    import gradio as gr

    gallery = gr.Gallery(label="Images (settings under each; the PNGs carry them too)", columns=4,
                         object_fit="contain", height="auto", elem_id="gallery", interactive=False)
    made = between() if between is not None else None
    files = gr.File(label="Download the PNGs", file_count="multiple", elem_id="files")
    return (gallery, files) if between is None else (gallery, made, files)


def generate_button(mode: str):
    import gradio as gr

    return gr.Button("Generate", variant="primary", elem_id=f"generate-{mode}")


def image_input(label: str, elem_id: str):
    from difflab.app.fields import image_upload

    return image_upload(label=label, type="pil", sources=("upload", "clipboard"), elem_id=elem_id,
                        elem_classes=["input-image"])


STRENGTH_STEP = 0.05  # the page's strength slider moves in these steps


def strength_slider(value: float, elem_id: str):
    from difflab.app.fields import slider

    return slider(STRENGTH_STEP, 1.0, value=value, step=STRENGTH_STEP,
                  label="Strength (how much is repainted: 1 = everything, 0.3 keeps most of the image)",
                  elem_id=elem_id)


def inpaint_inputs(editor, uploaded_mask):
    """The image and mask of the inpainting tab: the editor's background, and white wherever it was painted
    on (any layer) or the uploaded mask is white (both, when both are given)."""
    import numpy as np
    from PIL import Image, ImageChops

    from difflab.diffusion.inputs import read_image

    editor = editor or {}
    background = editor.get("background")
    image = None
    if background is not None:
        background = read_image(background, "image")
        if "A" in background.getbands():
            white = Image.new("RGBA", background.size, "white")
            background = Image.alpha_composite(white, background.convert("RGBA"))
        image = background.convert("RGB")
    painted = None
    for layer in editor.get("layers") or []:
        if layer is None:
            continue
        alpha = np.asarray(read_image(layer, "mask").convert("RGBA"))[..., 3] > 0
        painted = alpha if painted is None or painted.shape != alpha.shape else painted | alpha
    mask = Image.fromarray(painted.astype(np.uint8) * 255) if painted is not None and painted.any() else None
    if mask is not None and image is not None and mask.size != image.size:
        mask = mask.resize(image.size, Image.Resampling.NEAREST)
    if uploaded_mask is not None:
        uploaded = read_image(uploaded_mask, "mask").convert("L")
        if mask is None:
            mask = uploaded
        else:
            mask = ImageChops.lighter(mask, uploaded.resize(mask.size, Image.Resampling.NEAREST))
    return image, mask


def model_label(spec) -> str:
    """A short name for a model: its folder's name (its run folder's, for a run's model/), or its Hub id."""
    path = Path(spec).expanduser()
    if not path.exists():
        return str(spec)
    path = path.resolve()
    return path.parent.name if path.name == "model" and path.parent.name else path.name


def describe(model) -> str:
    info = model.info
    if model.prompts is not None:
        kind = model.kind
        return (f"{kind.label} latent diffusion model ({kind.pipeline}): {info.image_size}×{info.image_size} images by "
                f"default, in steps of {model.size_factor} pixels"
                + (f", trained on {info.data}." if info.data and info.data != "(unknown)" else "."))
    kind = f"class-conditional ({len(model.class_names)} classes)" if model.class_names else "unconditional"
    return (f"A {kind} diffusion model making {info.image_size}×{info.image_size} "
            f"{'RGB' if info.channels == 3 else f'{info.channels}-channel'} images"
            + (f", trained on {info.data}." if info.data else "."))


def launch(demo, host: str = "127.0.0.1", port: int | None = None, share: bool = False, **kwargs):
    """Serve `demo` and say where, in difflab's words (Gradio's own lines name its Python arguments, not difflab's
    flags); a host that is not this machine's, or a port that is taken, is a one-line error. `quiet` says nothing;
    `prevent_thread_lock` returns once serving, as in Gradio."""
    from difflab.errors import ConfigError

    check_host(host)
    quiet, wait = kwargs.pop("quiet", False), not kwargs.pop("prevent_thread_lock", False)
    try:
        demo.launch(server_name=host, server_port=port, share=share, show_error=False, quiet=True,
                    prevent_thread_lock=True, **kwargs)
    except OSError:
        where = f"port {port} on {host} is taken (or not yours to use)" if port else \
            f"every port from 7860 to 7959 on {host} is taken"
        raise ConfigError(f"cannot serve the demo: {where}; choose another --port") from None
    if not quiet:
        print(f"Serving the demo on {demo.local_url}" + (f" and on {demo.share_url}" if demo.share_url else ""),
              flush=True)
        if not share:
            print("(difflab demo --share also makes a temporary public link; Ctrl-C stops the demo)", flush=True)
    if wait:
        demo.block_thread()
    return demo


def check_host(host: str) -> None:
    """--host must be an address of this machine (or a name for one), before Gradio tries port after port on it."""
    import ipaddress
    import re
    import socket

    from difflab.errors import ConfigError

    advice = "give an address of this machine: 127.0.0.1 (this machine only) or 0.0.0.0 (every network)"
    if re.fullmatch(r"[\d.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigError(f"--host {host} is not an IP address (four numbers from 0 to 255); {advice}") from None
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError):
        raise ConfigError(f"--host {host} is not an address, nor a name this machine can look up; {advice}") from None
    with socket.socket(family, kind) as probe:
        try:
            probe.bind((address[0], 0))
        except OSError as e:
            raise ConfigError(f"cannot serve on --host {host}: it is not an address of this machine "
                              f"({e.strerror or e}); {advice}") from None
