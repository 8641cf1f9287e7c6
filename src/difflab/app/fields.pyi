"""Gradio components whose values difflab reads and checks itself, so that a bad value sent to the page or
its API (a damaged image, a PDF, a decompression bomb, seed="abc") gets difflab's one-line message, as on the
command line, rather than Gradio's "the upstream Gradio app has raised an exception".

Each is drawn in the page as the Gradio component it extends (`DrawnAsGradio`).
"""

from __future__ import annotations

import gradio as gr

from difflab.errors import DifflabError


def read_upload(payload, what: str):
    """An uploaded file (Gradio's FileData) read by difflab's hardened decoder: a PIL image, or a gr.Error that
    names the file as the visitor named it."""
    from difflab.diffusion.inputs import read_image

    path = str(payload.path)
    try:
        return read_image(path, what)
    except DifflabError as e:
        name = payload.orig_name or "upload"
        raise gr.Error(str(e).replace(repr(path), repr(name)), print_exception=False) from None


class DrawnAsGradio:
    """The page (and `gr.load`) see the Gradio component this class extends, not a new kind of component."""

    @classmethod
    def gradio_class(cls) -> type:
        return next(c for c in cls.__mro__ if c.__module__.startswith("gradio."))

    def get_block_name(self) -> str:
        return self.gradio_class().__name__.lower()

    def get_block_class(self) -> str:
        return self.gradio_class().__name__.lower()

from gradio.events import Dependency

class ImageInput(DrawnAsGradio, gr.Image):
    """An image upload, decoded by difflab (`read_image`) instead of by Gradio: a PIL image."""

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.path is None:  # a data: URL
            try:
                return super().preprocess(payload)
            except gr.Error:
                raise
            except Exception:  # noqa: BLE001 - whatever the decoder raised, the visitor sent a bad image
                raise gr.Error("cannot read the image sent; give a PNG or JPEG file", print_exception=False
                               ) from None
        return read_upload(payload, "image")
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class ImageEditor(DrawnAsGradio, gr.ImageEditor):
    """Gradio's image editor, whose files (background and painted layers) difflab's decoder reads first."""

    def preprocess(self, payload):
        if payload is not None and payload.id is None:
            for what, upload in [("image", payload.background), *(("mask", layer) for layer in payload.layers)]:
                if upload is not None and upload.path is not None:
                    read_upload(upload, what)
        try:
            return super().preprocess(payload)
        except gr.Error:
            raise
        except Exception:  # noqa: BLE001 - see ImageInput
            raise gr.Error("cannot read the image editor's images; give a PNG or JPEG file", print_exception=False
                           ) from None
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class PassOnBadValues:
    """A number Gradio cannot read goes on to the request's own check, which says what is wrong with it."""

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except gr.Error:
            raise
        except (TypeError, ValueError):
            return payload


class Number(DrawnAsGradio, PassOnBadValues, gr.Number):
    pass
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class Slider(DrawnAsGradio, PassOnBadValues, gr.Slider):
    pass
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component