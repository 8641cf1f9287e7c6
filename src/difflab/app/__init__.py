"""The Gradio demo: `build_demo(model)` makes the page, `export_space` a Hugging Face Space folder.

The demo never calls home: Gradio's analytics are off unless the environment turns them on.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from difflab.app.demo import build_demo, launch  # noqa: E402
from difflab.app.service import Limits, Request  # noqa: E402

__all__ = ["Limits", "Request", "build_demo", "launch"]
