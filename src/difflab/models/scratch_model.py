"""The teaching model as difflab's commands use it: a BasicUNet with its settings, images at fixed
seeds, and its folder on disk.

diffusers has no BasicUNet, so its folder is difflab's own, and as plain as it gets:

    model/basic_unet.safetensors   the weights (never a pickle)
    model/scratch.json             what it is: network, channels, image size, data, training
    model/README.md                a note for people who open the folder
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from difflab.errors import ModelError
from difflab.files import atomic_folder, read_json_object
from difflab.layout import SCRATCH_INFO_FILE, SCRATCH_WEIGHTS, local_model_folder
from difflab.models.presets import check_image_size
from difflab.models.scratch import BasicUNet, sample
from difflab.progress import progress_bar
from difflab.seeds import image_generators

NETWORK = "BasicUNet"
SCRATCH_SAMPLE_STEPS = 40  # the course's final grid uses 40 steps of the naive sampler
@dataclass
class ScratchInfo:
    """Saved as scratch.json."""

    image_size: int
    channels: int
    data: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    network: str = NETWORK
    format_version: int = 1


def check_scratch_image_size(image_size: int) -> None:
    """BasicUNet halves the image twice, so its side must divide by 4 (28 for MNIST works)."""
    check_image_size({"block_out_channels": [32, 64, 64]}, image_size, "from-scratch")


@dataclass
class ScratchModel:
    net: BasicUNet
    info: ScratchInfo

    @classmethod
    def new(cls, info: ScratchInfo, seed: int) -> ScratchModel:
        check_scratch_image_size(info.image_size)
        with torch.random.fork_rng():  # seeded weights, without touching the caller's global RNG
            torch.manual_seed(seed)
            net = BasicUNet(info.channels, info.channels)
        return cls(net, info)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def generate(self, count: int, steps: int = SCRATCH_SAMPLE_STEPS, *, seed: int = 0, batch_size: int = 64,
                 progress: bool = False) -> torch.Tensor:
        """`count` images [count, C, H, W] in [0, 1] on the CPU, by the naive sampler; image i starts
        from noise drawn with seed + i, as in `difflab sample`."""
        c, size = self.info.channels, self.info.image_size
        bar = progress_bar(total=-(-count // batch_size) * steps, desc="sampling (naive)", enabled=progress,
                           leave=False)
        out = []
        for start in range(0, count, batch_size):
            generators = image_generators(seed, min(batch_size, count - start), start)
            x = torch.cat([torch.rand((1, c, size, size), generator=g) for g in generators]).to(self.device)

            def net(x_t):
                bar.update()
                return self.net(x_t)

            out.append(sample(net, x, steps).clamp(0, 1).float().cpu())
        bar.close()
        return torch.cat(out)

    # ---- on disk -------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the model folder; an existing one is replaced only once the new one is complete."""
        from safetensors.torch import save_file

        folder = Path(folder)
        with atomic_folder(folder) as partial:
            weights = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
            save_file(weights, str(partial / SCRATCH_WEIGHTS), metadata={"network": NETWORK})
            (partial / SCRATCH_INFO_FILE).write_text(json.dumps(asdict(self.info), indent=2) + "\n", encoding="utf-8")
            (partial / "README.md").write_text(readme(self), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, spec: str | Path, device="cpu") -> ScratchModel:
        """A folder written by `difflab scratch train` (or the run folder that holds it)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from difflab.models.weights import check_weights

        folder = local_model_folder(spec)
        if not (folder / SCRATCH_INFO_FILE).is_file():
            if (folder / "model_index.json").is_file():
                raise ModelError(f"{spec} is a diffusers model, not a from-scratch one; sample it with difflab sample")
            raise ModelError(f"{spec} is not a from-scratch model (it has no {SCRATCH_INFO_FILE}); "
                             "give a folder written by difflab scratch train")
        data = read_json_object(folder / SCRATCH_INFO_FILE, ModelError, "; the model folder is damaged")
        try:
            info = ScratchInfo(**{k: v for k, v in data.items() if k in ScratchInfo.__dataclass_fields__})
        except TypeError:
            raise ModelError(f"{folder / SCRATCH_INFO_FILE} lacks the image size or channels; "
                             "the model folder is damaged") from None
        if info.network != NETWORK or info.channels not in (1, 3):
            raise ModelError(f"{folder / SCRATCH_INFO_FILE} describes a {info.network} with {info.channels} channels; "
                             f"this version of difflab makes {NETWORK}s with 1 or 3")
        net = BasicUNet(info.channels, info.channels)
        try:
            net.load_state_dict(check_weights(load_file(str(folder / SCRATCH_WEIGHTS)), folder / SCRATCH_WEIGHTS))
        except (OSError, SafetensorError, RuntimeError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelError(f"cannot load the weights in {folder / SCRATCH_WEIGHTS} ({reason}); "
                             "the model folder is damaged: train it again") from None
        return cls(net.eval().to(device), info)


def readme(model: ScratchModel) -> str:
    info, training = model.info, model.info.training
    parameters = sum(p.numel() for p in model.net.parameters())
    channels = f"{info.channels} channel{'s' if info.channels > 1 else ''}"
    trained = (f"for {training['steps']:,} steps of {training.get('batch_size', '?')} images from `{info.data}`"
               if "steps" in training else f"on `{info.data}`")
    return f"""# {NETWORK}: the from-scratch teaching model

The minimal UNet of the Hugging Face Diffusion Models Course, unit 1 ({parameters:,} parameters,
{channels}, {info.image_size}×{info.image_size} images), trained {trained} to
predict clean images from images mixed with uniform noise. Made with `difflab scratch train`; see
difflab's docs/from-scratch.md.

```bash
difflab scratch sample --model PATH/TO/THIS/FOLDER -n 16 --out grid.png
```

```python
from safetensors.torch import load_file
from difflab.scratch import BasicUNet
net = BasicUNet({info.channels}, {info.channels})
net.load_state_dict(load_file("{SCRATCH_WEIGHTS}"))
```
"""
