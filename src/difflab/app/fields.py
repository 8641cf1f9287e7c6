"""Gradio components whose values difflab reads and checks itself, so that a bad value sent to the page or
its API (a damaged image, a PDF, a decompression bomb, seed="abc") gets difflab's one-line message, as on the
command line, rather than Gradio's "the upstream Gradio app has raised an exception".

Each is a plain Gradio component whose `preprocess` (what turns the value sent into the handler's argument)
is wrapped; not a subclass, which Gradio would treat as a new kind of component (and write a .pyi file for).
"""

from __future__ import annotations

import gradio as gr

from difflab.errors import DifflabError


def slider(*args, **kwargs) -> gr.Slider:
    return checked(gr.Slider(*args, **kwargs), pass_on_bad_values)


def number(*args, **kwargs) -> gr.Number:
    return checked(gr.Number(*args, **kwargs), pass_on_bad_values)


def image_upload(**kwargs) -> gr.Image:
    """An image upload, decoded by difflab's hardened decoder (`read_image`) instead of by Gradio: a PIL image."""
    return checked(gr.Image(**kwargs), read_image_upload)


def image_editor(**kwargs) -> gr.ImageEditor:
    """Gradio's image editor, whose files (background and painted layers) difflab's decoder reads first."""
    return checked(gr.ImageEditor(**kwargs), read_editor_uploads)


def checked(component, preprocess):
    """`component`, whose values go through `preprocess(gradio's own preprocess, value sent)`."""
    own = component.preprocess
    component.preprocess = lambda payload: preprocess(own, payload)
    return component


def pass_on_bad_values(own, payload):
    """A number Gradio cannot read goes on to the request's own check, which says what is wrong with it."""
    try:
        return own(payload)
    except gr.Error:
        raise
    except (TypeError, ValueError):
        return payload


def read_image_upload(own, payload):
    if payload is None:
        return None
    if payload.path is None:  # a data: URL
        try:
            return own(payload)
        except gr.Error:
            raise
        except Exception:  # noqa: BLE001 - whatever the decoder raised, the visitor sent a bad image
            raise gr.Error("cannot read the image sent; give a PNG or JPEG file", print_exception=False) from None
    return read_upload(payload, "image")


def read_editor_uploads(own, payload):
    if payload is not None and payload.id is None:
        for what, upload in [("image", payload.background), *(("mask", layer) for layer in payload.layers)]:
            if upload is not None and upload.path is not None:
                read_upload(upload, what)
    try:
        return own(payload)
    except gr.Error:
        raise
    except Exception:  # noqa: BLE001 - see read_image_upload
        raise gr.Error("cannot read the image editor's images; give a PNG or JPEG file", print_exception=False
                       ) from None


def read_upload(payload, what: str):
    """An uploaded file (Gradio's FileData) read by difflab's decoder: a PIL image, or a gr.Error that names the
    file as the visitor named it."""
    from difflab.diffusion.inputs import read_image

    path = str(payload.path)
    try:
        return read_image(path, what)
    except DifflabError as e:
        name = payload.orig_name or "upload"
        raise gr.Error(str(e).replace(repr(path), repr(name)), print_exception=False) from None
