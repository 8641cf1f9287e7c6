"""The LoRAs a demo offers: given when it starts (`difflab demo --model BASE --lora RUN_OR_FILE ...`), found
before the model loads, applied once onto the model as adapters with the LoRA code `difflab sample --lora`
uses (`storage.lora`), and switched per request: each request chooses one LoRA (or none) and its weight,
so the page never reads a file a visitor names.
"""

from __future__ import annotations

from pathlib import Path

from difflab.layout import LORA_WEIGHTS, RUN_MODEL
from difflab.storage.lora import LoraSource, apply_lora, plan_loras, use_lora


class LoraMenu:
    """{label: LoRA} for the page's picker; `load(model)` applies them, `use(model, label, scale)` picks one."""

    def __init__(self, specs, *, allow_pickle: bool = False):
        sources = [source for source, _ in plan_loras(list(specs), allow_pickle=allow_pickle)]
        self.sources: dict[str, LoraSource] = {}
        for source in sources:
            label = lora_label(source)
            if label in self.sources:  # two LoRAs with one name: tell them apart by the path as given
                label = source.spec
            self.sources[label] = source
        self.adapters: dict[str, str] = {}  # label -> adapter name on the model

    @property
    def labels(self) -> list[str]:
        return list(self.sources)

    def __bool__(self) -> bool:
        return bool(self.sources)

    def load(self, model) -> None:
        """Apply every LoRA onto `model` (each checked against it: a LoRA for another base is refused here)."""
        for label, source in self.sources.items():
            self.adapters[label] = apply_lora(model, source, 1.0)
        use_lora(model, None)

    def use(self, model, label: str | None, scale: float) -> None:
        """Only LoRA `label` active, at weight `scale`; None: the base model."""
        if self.adapters:
            use_lora(model, self.adapters[label] if label else None, scale)

    def spec(self, label: str) -> str:
        """The LoRA as given when the demo started (what its PNGs record, as `difflab sample --lora` does)."""
        return self.sources[label].spec


def lora_label(source: LoraSource) -> str:
    """A short name for a LoRA: its run folder's or folder's name for diffusers' usual file name, else the file's."""
    if source.file is None:
        return source.repo_id
    path = Path(source.file)
    if path.stem != Path(LORA_WEIGHTS).stem:
        return path.stem
    folder = path.parent
    return folder.parent.name if folder.name == RUN_MODEL and folder.parent.name else folder.name
