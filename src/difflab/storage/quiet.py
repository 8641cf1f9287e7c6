"""diffusers' and transformers' notes, silenced where difflab says what matters itself."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def quiet_diffusers():
    """diffusers' notes (disabled safety checkers, adapter bookkeeping) are not for difflab's users."""
    import transformers
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" of the text encoder's adapter
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
