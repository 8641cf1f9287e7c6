"""A new user's mistakes with the demo, through its API (gradio_client, against a demo served on 127.0.0.1)
and its command: damaged, non-image and bomb images, values Gradio cannot read, strength advice within the
demo's limits, LoRAs by the picker's name; a LoRA run given as the model, a host that is not this machine's,
a port that is taken, and the start-up lines (difflab's flags, not Gradio's launch() arguments).
"""

from __future__ import annotations

import os
import re
import shlex
import socket

import pytest
from PIL import Image

from difflab.app.service import Limits
from difflab.cli import main
from difflab.errors import ConfigError
from helpers.loras import tiny_loras
from helpers.web import free_port
from test_hostile_images import handmade_png

LIMITS = Limits(max_steps=10, max_images=2, max_image_size=64)
SHARED = ["a fox", "", "ddim", 2, 1, 1, 16, 16, 7.5, "#ff0000", 0, 0]  # prompt ... clip scale, as the page sends


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_loras(tmp_path_factory.mktemp("loras"))


@pytest.fixture(scope="module")
def client(files, tmp_path_factory):
    from gradio_client import Client

    from difflab.app import build_demo, launch

    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    demo = build_demo(files["base"], limits=LIMITS, loras=[files["a"], files["b"]])
    port = free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    yield Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
    demo.close()


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    Image.new("RGB", (16, 16), "teal").save(folder / "good.png")
    (folder / "damaged.png").write_bytes((folder / "good.png").read_bytes()[:60])
    (folder / "paper.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n")
    (folder / "bomb.png").write_bytes(handmade_png(100_000, 100_000, 8, 0, b""))
    return folder


def editor(path):
    from gradio_client import handle_file

    return {"background": handle_file(str(path)), "layers": [], "composite": None}


@pytest.mark.parametrize("endpoint, case, message", [
    ("txt2img", dict(seed="abc"), "seed must be a whole number from 0 to 4294967295 (got 'abc')"),
    ("txt2img", dict(steps="abc"), "steps must be a whole number from 1 to 10 (got 'abc')"),
    ("img2img", dict(image="damaged.png"), "cannot read the image 'damaged.png' ("),
    ("img2img", dict(image="paper.pdf"), "cannot read the image 'paper.pdf' (not an image file (PNG, JPEG, WebP, "
                                         "BMP or GIF)); give a PNG or JPEG file"),
    ("img2img", dict(image="bomb.png"), "cannot read the image 'bomb.png' (too many pixels (possible decompression "
                                        "bomb)); give a PNG or JPEG file"),
    ("inpaint", dict(editor="paper.pdf"), "cannot read the image 'paper.pdf' (not an image file"),
    ("inpaint", dict(editor="good.png", mask="damaged.png"), "cannot read the image 'damaged.png' ("),
    # at 2 steps a strength of 0.05 runs no step; 20 steps would, but this demo allows 10
    ("img2img", dict(image="good.png", strength=0.05), "strength 0.05 of 2 steps is no step at all: raise the "
                                                       "strength to at least 0.5 at 2 steps, or to at least 0.1 at 10 "
                                                       "steps (the most allowed here)"),
    ("img2img", dict(image="good.png", strength=0.2), "strength 0.2 of 2 steps is no step at all: raise --strength "
                                                      "or --steps (at least 5 steps at this strength, or a strength of "
                                                      "at least 0.5 at 2 steps)"),
    ("txt2img", dict(lora="nope"), "nope is not in the list of choices"),  # Gradio's check of the picker
    ("txt2img", dict(lora="lora-b", lora_scale="abc"), "LoRA weight must be a number from 0 to 2 (got 'abc')"),
])
def test_bad_api_requests_get_difflabs_one_line_message(client, uploads, endpoint, case, message):
    from gradio_client import handle_file

    values = list(SHARED)
    if "seed" in case:
        values[4] = case["seed"]
    if "steps" in case:
        values[3] = case["steps"]
    if endpoint == "img2img":
        values += [handle_file(str(uploads / case["image"])), case.get("strength", 0.5)]
    if endpoint == "inpaint":
        mask = handle_file(str(uploads / case["mask"])) if "mask" in case else None
        values += [editor(uploads / case["editor"]), mask, 1.0]
    if "lora" in case:
        values += [case["lora"], case.get("lora_scale", 1.0)]
    with pytest.raises(Exception) as caught:
        client.predict(*values, api_name=f"/{endpoint}")
    text = str(caught.value)
    print(text)
    assert message in text
    assert "\n" not in text and "upstream Gradio app" not in text


def test_the_api_picks_a_lora_by_its_name_and_takes_none_by_default(client, files):
    from difflab.images import png_settings

    (with_lora,), (path,) = client.predict(*SHARED, "lora-b", 0.5, api_name="/txt2img")
    assert with_lora["caption"] == "seed 1 · CFG 7.5 · ddim, 2 steps · 16×16 · LoRA lora-b ×0.5"
    settings = png_settings(path["path"])
    assert settings["lora"] == [str(files["b"])] and settings["lora_scale"] == [0.5]
    (base,), _ = client.predict(*SHARED, api_name="/txt2img")  # no LoRA named: the base model
    assert base["caption"] == "seed 1 · CFG 7.5 · ddim, 2 steps · 16×16"


def test_a_lora_run_given_as_the_model_names_a_command_that_works(files, capsys, monkeypatch):
    import difflab.app

    assert main(["-q", "demo", "--model", str(files["a"])]) == 2
    error = capsys.readouterr().err
    assert "holds a LoRA, which adapts a base model" in error and "--port" not in error
    suggested = re.search(r"as in (--model \S+ --lora \S+)", error)[1]
    assert suggested == f"--model {files['base']} --lora {files['a']}"  # the base its config.toml names
    served = []
    monkeypatch.setattr(difflab.app, "launch", lambda demo, **kwargs: served.append(demo))
    assert main(["-q", "demo", *shlex.split(suggested)]) == 0
    (picker,) = [c for c in served[0].config["components"] if c["props"].get("elem_id") == "lora"]
    assert [value for _, value in picker["props"]["choices"]] == ["", "lora-run"]



def test_an_exported_space_carries_its_loras_and_embeddings(files, tmp_path, monkeypatch):
    """`--export` copies each LoRA and embedding in; the Space's app.py offers the same picker and tokens."""
    import runpy

    import gradio
    import torch
    from safetensors.torch import save_file

    from difflab.storage.folder import load_model

    width = load_model(files["base"]).prompts.text_encoder.config.hidden_size
    embedding = tmp_path / "toy.safetensors"
    save_file({"<toy>": torch.randn(2, width, generator=torch.Generator().manual_seed(0))}, str(embedding))
    space = tmp_path / "space"
    assert main(["-q", "demo", "--model", str(files["base"]), "--lora", str(files["a"]), "--lora", str(files["b"]),
                 "--embedding", f"{embedding}:<shiny>", "--export", str(space)]) == 0
    assert {p.name for p in space.iterdir()} >= {"loras", "embeddings", "model", "app.py"}
    served = []
    monkeypatch.setattr(gradio.Blocks, "launch", lambda demo, **kwargs: served.append(demo))
    runpy.run_path(str(space / "app.py"))
    (picker,) = [c for c in served[0].config["components"] if c["props"].get("elem_id") == "lora"]
    assert [value for _, value in picker["props"]["choices"]] == ["", "lora-run", "lora-b"]
    app = (space / "app.py").read_text()
    assert str(files["a"]) not in app and str(embedding) not in app  # the Space reads its own copies
    assert (space / "loras" / "lora-run" / "pytorch_lora_weights.safetensors").is_file()
    shown = " ".join(str(c["props"].get("value", "")) for c in served[0].config["components"])
    assert "<shiny>" in shown  # the embedding's token, as it was given, listed under the prompt


@pytest.mark.parametrize("host, message", [
    ("256.1.1.1", "--host 256.1.1.1 is not an IP address (four numbers from 0 to 255); give an address of this "
                  "machine: 127.0.0.1 (this machine only) or 0.0.0.0 (every network)"),
    ("192.0.2.1", "cannot serve on --host 192.0.2.1: it is not an address of this machine"),  # TEST-NET-1
    ("no-such-host.invalid", "--host no-such-host.invalid is not an address, nor a name this machine can look up"),
])
def test_a_host_that_is_not_this_machines_is_blamed(files, capsys, host, message):
    assert main(["-q", "demo", "--model", str(files["base"]), "--host", host]) == 2
    error = capsys.readouterr().err
    assert message in error and "--port" not in error and error.count("\n") == 1


def test_a_taken_port_is_blamed_and_the_start_up_lines_name_difflabs_flags(files, capsys, tmp_path):
    from difflab.app import build_demo, launch

    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path / "gradio")
    demo = build_demo(files["base"], limits=LIMITS)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^cannot serve the demo: port {port} on 127.0.0.1 is taken \(or not "
                                              r"yours to use\); choose another --port$"):
            launch(demo, port=port, prevent_thread_lock=True)
    port = free_port()
    capsys.readouterr()
    launch(demo, port=port, prevent_thread_lock=True)
    try:
        out = capsys.readouterr().out
    finally:
        demo.close()
    assert f"Serving the demo on http://127.0.0.1:{port}/" in out
    assert "difflab demo --share" in out
    assert "share=True" not in out and "launch()" not in out  # Gradio's own advice, for its Python API
