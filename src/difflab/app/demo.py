"""The Gradio page in front of `difflab.app.service`: one model, its controls, a gallery.

`build_demo(model)` returns a `gr.Blocks` with its queue set up (one request samples at a time, at
most `limits.max_queue` wait), so `build_demo("model").launch()` is a whole app.
"""

from __future__ import annotations

from pathlib import Path

from difflab.app.guides import Guides
from difflab.app.service import MAX_CFG_SCALE, MAX_SEED, Generator, Limits, Request, check_model
from difflab.diffusion.samplers import DEFAULT_CFG_SCALE, DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS
from difflab.errors import DifflabError

RANDOM_SEED_JS = f"() => Math.floor(Math.random() * {MAX_SEED + 1})"  # in the page: no round trip
CSS = "#gallery img { image-rendering: pixelated; }"  # small images stay sharp when enlarged


def build_demo(model_spec: str | Path, *, clip_model: str | None = None, limits: Limits | None = None,
               device="auto", allow_pickle: bool = False, title: str | None = None):
    import gradio as gr

    from difflab.devices import pick_device
    from difflab.pipelines.folder import load_model

    limits = limits or Limits()
    device = pick_device(device) if isinstance(device, str) else device
    model = load_model(model_spec, allow_pickle=allow_pickle, device=device)
    check_model(model, limits, model_spec)
    guides = Guides(clip_model, device=device)
    name = model_label(model_spec)
    generator = Generator(model, name, limits, guides)
    classes = model.class_names or []
    title = title or f"difflab · {name}"

    def on_generate(sampler, steps, seed, count, class_name, cfg_scale, color, color_scale, prompt, clip_scale,
                    progress=gr.Progress(track_tqdm=True)):
        request = Request(sampler=sampler, steps=steps, seed=seed, count=count, class_name=class_name or None,
                          cfg_scale=cfg_scale, color=color, color_scale=color_scale, prompt=prompt,
                          clip_scale=clip_scale)
        try:
            results = generator(request, progress=True)
        except DifflabError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return [(str(path), text) for path, text in results], [str(path) for path, _ in results]

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        gr.HTML(f"<style>{CSS}</style>", padding=False)
        gr.Markdown(f"## {title}\n{describe(model)}")
        with gr.Row():
            with gr.Column(scale=1):
                sampler = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler", elem_id="sampler")
                steps = gr.Slider(1, limits.max_steps, value=min(DEFAULT_STEPS, limits.max_steps), step=1,
                                  label="Steps", elem_id="steps")
                with gr.Row(equal_height=True):
                    seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", elem_id="seed",
                                     scale=3)
                    randomize = gr.Button("Random seed", elem_id="random-seed", scale=1)
                count = gr.Slider(1, limits.max_images, value=min(4, limits.max_images), step=1,
                                  label="Number of images", elem_id="count")
                class_name = gr.Dropdown(classes, value=classes[0] if classes else None, label="Class",
                                         visible=bool(classes), elem_id="class")
                cfg_scale = gr.Slider(0, MAX_CFG_SCALE, value=DEFAULT_CFG_SCALE, step=0.1,
                                      label="Classifier-free guidance scale (1 = plain conditional)",
                                      visible=bool(classes), elem_id="cfg-scale")
                with gr.Group():
                    color = gr.ColorPicker("#ff0000", label="Colour guidance: colour", elem_id="color")
                    color_scale = gr.Slider(0, guides.max_color_scale, value=0, step=1,
                                            label=f"Colour guidance scale (0 = off; {guides.default_color_scale:g} "
                                                  "is a good start)", elem_id="color-scale")
                with gr.Group(visible=guides.clip is not None):
                    prompt = gr.Textbox("", label="CLIP guidance: prompt", elem_id="prompt", max_lines=1)
                    clip_scale = gr.Slider(0, guides.max_clip_scale or 1, value=0, step=0.5,
                                           label=f"CLIP guidance scale (0 = off; {guides.default_clip_scale:g} "
                                                 "is a good start)", elem_id="clip-scale")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Images (settings under each; the PNGs carry them too)", columns=4,
                                     object_fit="contain", height="auto", elem_id="gallery")
                files = gr.File(label="Download the PNGs", file_count="multiple", elem_id="files")
        gr.Markdown(f"Limits: at most {limits.max_steps} steps and {limits.max_images} images a request; "
                    "requests queue and run one at a time.")
        randomize.click(None, outputs=seed, js=RANDOM_SEED_JS)
        run.click(on_generate, inputs=[sampler, steps, seed, count, class_name, cfg_scale, color, color_scale,
                                       prompt, clip_scale],
                  outputs=[gallery, files], api_name="generate", concurrency_limit=1)
    demo.queue(default_concurrency_limit=1, max_size=limits.max_queue)
    return demo


def model_label(spec) -> str:
    """A short name for a model: its folder's name (its run folder's, for a run's model/), or its Hub id."""
    path = Path(spec).expanduser()
    if not path.exists():
        return str(spec)
    path = path.resolve()
    return path.parent.name if path.name == "model" and path.parent.name else path.name


def describe(model) -> str:
    info = model.info
    kind = f"class-conditional ({len(model.class_names)} classes)" if model.class_names else "unconditional"
    return (f"A {kind} diffusion model making {info.image_size}×{info.image_size} "
            f"{'RGB' if info.channels == 3 else f'{info.channels}-channel'} images"
            + (f", trained on {info.data}." if info.data else "."))


def launch(demo, host: str = "127.0.0.1", port: int | None = None, share: bool = False, **kwargs):
    """Serve `demo`; a port already taken is a one-line error."""
    from difflab.errors import ConfigError

    try:
        return demo.launch(server_name=host, server_port=port, share=share, show_error=False, **kwargs)
    except OSError as e:
        raise ConfigError(f"cannot serve on {host}:{port or 'the default port'} ({e}); "
                          "choose another --port") from None
