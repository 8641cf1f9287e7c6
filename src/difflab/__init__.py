"""difflab: train, sample, guide, condition, fine-tune, measure and share image diffusion models.

`difflab.load_model(spec)` and `difflab.generate(model, difflab.GenerationRequest(n, ...))` are the calls
most scripts need (the request holds every setting of one generation: docs/design.md); they are imported
on first use, so that `import difflab` (and `difflab --help`) stays instant."""

__version__ = "0.1.0"

_LAZY = {"generate": "difflab.diffusion.generate", "GenerationRequest": "difflab.diffusion.request",
         "load_model": "difflab.storage.folder", "apply_lora": "difflab.storage.lora"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'difflab' has no attribute {name!r}")
