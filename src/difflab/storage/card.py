"""The README.md model card written into every model folder."""

from __future__ import annotations

from difflab.layout import is_hub_id
from difflab.models.model import DiffusionModel, TrainingRecord

SCHEDULE_NAMES = {"squaredcos_cap_v2": "cosine"}


def model_card(model: DiffusionModel, name: str, config_toml: str = "") -> str:
    info, schedule = model.info, model.noise_schedule.config
    training = info.training
    parameters = sum(p.numel() for p in model.denoiser.parameters())
    colour = "grey" if info.channels == 1 else "RGB"
    classes = model.class_names
    origin = f"fine-tuned from `{info.base_model}`" if info.base_model else "trained from scratch"
    rows = [("base model", f"`{info.base_model}` (fine-tuned from its weights and noise schedule)")
            ] if info.base_model else []
    rows += [
        ("data", f"`{info.data}`" + (f" ({training.images:,} images)" if training.images is not None else "")),
        ("network", f"diffusers {type(model.unet).__name__}, {parameters / 1e6:.2f} M parameters"
                    + (f" (preset `{training.preset}`)" if training.preset is not None else "")),
        ("noise schedule", f"{SCHEDULE_NAMES.get(schedule.beta_schedule, schedule.beta_schedule)}, "
                           f"{schedule.num_train_timesteps} steps, predicts {model.prediction}"),
    ]
    if training.steps is not None:
        rows.append(("training", f"{training.steps:,} optimizer steps, {training.images_seen or 0:,} "
                                 f"images seen, {training.minutes or 0:.1f} minutes on "
                                 f"{training.device or '?'}"
                                 + (f", timesteps shifted towards high noise by {training.timestep_shift}"
                                    if training.timestep_shift is not None else "")))
    if classes:
        door = ("an embedding added to the timestep embedding" if info.class_method == "embedding"
                else f"a {info.class_embed_dim}-channel embedding concatenated to the input")
        dropout = training.cond_dropout
        rows.append(("classes", f"{len(classes)} ({', '.join(classes[:10])}{', …' if len(classes) > 10 else ''}), "
                                f"through {door}" + (f"; labels dropped with chance {dropout} in training, for "
                                                     "classifier-free guidance" if dropout else "")))
    if model.latent:
        codec, text_encoder = model.codec, model.prompts.text_encoder
        rows.append(("latent space", f"{type(codec.vae).__name__}: {codec.channels} channels, {codec.factor}× smaller "
                                     f"per side, scaling factor {codec.scaling_factor:.5g}"))
        rows.append(("text encoder", f"{type(text_encoder).__name__}, {model.prompts.max_tokens} tokens, width "
                                     f"{text_encoder.config.hidden_size}; prompts reach the UNet by cross-attention"))
        rows.append(("kind", f"{model.kind.pipeline}: the UNet takes {model.kind.about}"))
    if training.vae is not None:  # a text-to-image model trained by difflab
        psnr = f", reconstruction PSNR {training.vae_psnr:.1f} dB" if training.vae_psnr else ""
        trained = "trained with the UNet" if training.text_encoder_trained else "frozen"
        rows.append(("components", f"VAE: {training.vae}{psnr}; text encoder: {training.text_encoder} "
                                   f"({trained}); {training.captions or 0:,} distinct captions, dropped with "
                                   f"chance {training.cond_dropout or 0} for classifier-free guidance"))
    rows += _dreambooth_rows(training, with_prompt=True)
    for label, figures in info.evaluation.items():
        rows.append((label, figures))
    if training.ema_decay:
        rows.append(("weights", f"exponential moving average (decay {training.ema_decay})"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    if model.latent:
        use, kind, task = _text_use(model, name), "text-to-image", model.kind.task
    elif classes:
        use, kind, task = _conditional_use(model, name), "class-conditional", "unconditional-image-generation"
    else:
        use, kind, task = _unconditional_use(name), "unconditional", "unconditional-image-generation"
    config_block = ""
    if config_toml:
        config_block = f"\n## Settings\n\nThe run's full `config.toml`:\n\n```toml\n{config_toml}```\n"
    base_model = f"base_model: {info.base_model}\n" if info.base_model and is_hub_id(info.base_model) else ""
    return f"""---
library_name: diffusers
pipeline_tag: {task}
{base_model}tags:
- difflab
- {kind}
- diffusion-models-class
- pytorch
---

# {name}

A {info.image_size}×{info.image_size} {colour} {"latent text-to-image " if model.latent else "image "}diffusion \
model, {origin} with difflab on `{info.data}`.

| | |
|---|---|
{table}

{use}{config_block}"""


def _unconditional_use(name: str) -> str:
    return f"""## Use

With difflab (image *i* of a batch uses seed `SEED + i`):

```bash
difflab sample --model {name} -n 16 --sampler dpm++2m --steps 20 --seed 0 --out grid.png
```

With plain diffusers (the same images as `difflab sample --sampler ddpm --steps 1000 --seed 0`):

```python
import torch
from diffusers import DDPMPipeline

pipe = DDPMPipeline.from_pretrained("{name}")
generators = [torch.Generator().manual_seed(i) for i in range(16)]
images = pipe(batch_size=16, generator=generators, num_inference_steps=1000).images
```

Any diffusers scheduler can replace the DDPM one, for example
`pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)` for 20-step sampling.
"""


def _conditional_use(model: DiffusionModel, name: str) -> str:
    null = len(model.class_names)
    if model.info.class_method == "embedding":
        call = "unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample"
        load_extra = ""
    else:
        call = ("unet(torch.cat([torch.cat([x, x]), embed(torch.cat([labels, null]))], dim=1), t).sample")
        load_extra = f"""from safetensors.torch import load_file
table = load_file("{name}/conditioning.safetensors")["class_embedding.weight"]
embed = lambda c: table[c][:, :, None, None].expand(-1, -1, *x.shape[-2:])  # label -> extra input channels
"""
    return f"""## Use

With difflab (`--class all` draws one row per class; `--cfg-scale` sets classifier-free guidance):

```bash
difflab sample --model {name} --class all -n 8 --cfg-scale 2 --out grid.png
difflab sample --model {name} --class {model.class_names[0]} -n 16 --out one-class.png
```

With plain diffusers, classifier-free guidance by hand (the null class, "no label", is {null}):

```python
import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DModel

unet = UNet2DModel.from_pretrained("{name}", subfolder="unet").eval()
scheduler = DPMSolverMultistepScheduler.from_pretrained("{name}", subfolder="scheduler")
{load_extra}labels = torch.tensor([0, 0, 1, 1])
null = torch.full_like(labels, {null})
x = torch.randn(len(labels), {model.info.channels}, {model.info.image_size}, {model.info.image_size})
scheduler.set_timesteps(20)
with torch.no_grad():
    for t in scheduler.timesteps:
        conditional, unconditional = {call}.chunk(2)
        x = scheduler.step(unconditional + 2.0 * (conditional - unconditional), t, x).prev_sample
images = (x / 2 + 0.5).clamp(0, 1)
```
"""


def _text_use(model: DiffusionModel, name: str) -> str:
    """How to run a Stable Diffusion family folder with difflab and with plain diffusers."""
    kind = model.kind
    prompt = (model.info.training.instance_prompt or "a red circle").replace('"', '\\"')
    inputs, call_inputs = kind.cli_inputs, kind.call_inputs
    more = ("" if "img2img" not in kind.modes else f"""
img2img and inpainting with the same folder:

```bash
difflab sample --model {name} --prompt "{prompt}" --image photo.png --strength 0.6 --out img2img.png
difflab sample --model {name} --prompt "{prompt}" --image photo.png --mask mask.png --out inpainted.png
```
""")
    return f"""## Use

With difflab (image *i* uses seed `SEED + i`; every sampler works, `--cfg-scale` sets classifier-free guidance):

```bash
difflab sample --model {name} --prompt "{prompt}"{inputs} --negative-prompt "blurry" \\
    --cfg-scale 7.5 --sampler dpm++2m --steps 20 -n 4 --seed 0 --out grid.png
```
{more}
With plain diffusers (the same images as the difflab command above, for the same seeds):

```python
import torch
from diffusers import DPMSolverMultistepScheduler, {kind.pipeline}

pipe = {kind.pipeline}.from_pretrained("{name}")
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                         solver_order=2)
generators = [torch.Generator().manual_seed(i) for i in range(4)]
images = pipe(["{prompt}"] * 4, negative_prompt=["blurry"] * 4, guidance_scale=7.5, num_inference_steps=20,
              generator=generators{call_inputs}).images
```
"""


def lora_card(name: str, base_model: str, *, rank: int, alpha: float, targets: dict[str, list[str]],
              parameters: int | None = None, instance_prompt: str | None = None, prompt: str | None = None,
              scale: float = 1.0, data: str | None = None, training: TrainingRecord | None = None,
              token: str | None = None) -> str:
    """The README.md of a LoRA folder (`pytorch_lora_weights.safetensors`): the base model it adapts,
    its rank, alpha and target modules, and how to use it with difflab and with plain diffusers.

    `name` is how the folder is named (its path; `difflab push` renames it to the repo id),
    `targets` {"unet": [...], "text_encoder": [...]} as `models.lora.lora_summary` gives them. The front
    matter is what the Hub files a LoRA by (`base_model` when it is a Hub id, the `lora` tag), as
    `difflab push` expects it."""
    prompt = prompt or instance_prompt or "a photo"
    hub_base = is_hub_id(base_model)
    networks = {"unet": "UNet", "text_encoder": "text encoder"}
    rows = [("base model", f"`{base_model}`" + ("" if hub_base else " (a local folder)")),
            ("rank", f"{rank} (alpha {alpha:g}: the update is scaled by alpha/rank = {alpha / rank:g})"),
            ("target modules", "; ".join(f"{networks.get(part, part)}: {', '.join(f'`{m}`' for m in mods)}"
                                         for part, mods in targets.items()))]
    if parameters:
        rows.append(("size", f"{parameters:,} parameters ({parameters * 4 / 2**20:.2f} MiB in float32)"))
    if instance_prompt:
        named = f" (the subject's token: `{token}`)" if token else ""
        rows.append(("instance prompt", f"`{instance_prompt}`{named}"))
    training = training or TrainingRecord()
    rows += _dreambooth_rows(training)
    if data:
        rows.append(("data", f"`{data}`"))
    rows += _training_rows(training)
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    front = [("library_name", "diffusers"), ("pipeline_tag", "text-to-image")]
    if hub_base:
        front.append(("base_model", base_model))
    if instance_prompt:
        front.append(("instance_prompt", _yaml_string(instance_prompt)))
    tags = ["text-to-image", "diffusers", "lora", "difflab", "template:sd-lora"]
    metadata = "\n".join(f"{k}: {v}" for k, v in front) + "\ntags:\n" + "".join(f"- {t}\n" for t in tags)
    quoted = prompt.replace('"', '\\"')
    return f"""---
{metadata}---

# {name}

A LoRA (low-rank adapters, diffusers format) for the text-to-image model `{base_model}`, made with difflab.

| | |
|---|---|
{table}

## Use

With difflab (`--lora-scale` is the adapter's weight: 0 gives the base model, 1 the LoRA as trained; repeat
`--lora` to combine several LoRAs, with one weight each):

```bash
difflab sample --model {base_model} --lora "{name}" --lora-scale {scale:g} \\
    --prompt "{quoted}" --sampler dpm++2m --steps 20 -n 4 --seed 0 --out grid.png
```

From Python: `difflab.apply_lora(difflab.load_model("{base_model}"), "{name}", {scale:g})`, then `difflab.generate`.

With plain diffusers (the same images as the difflab command above, for the same seeds):

```python
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{base_model}")
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                         solver_order=2)
pipe.load_lora_weights("{name}", adapter_name="lora")
pipe.set_adapters("lora", {scale:g})
generators = [torch.Generator().manual_seed(i) for i in range(4)]
images = pipe(["{quoted}"] * 4, num_inference_steps=20, generator=generators).images
```

The file is `pytorch_lora_weights.safetensors`: tensors named `unet.…` and `text_encoder.…` (diffusers'
LoRA format), with each network's peft `LoraConfig` (rank, alpha, target modules) in the file's metadata.
"""


def _dreambooth_rows(training: TrainingRecord, with_prompt: bool = False) -> list[tuple[str, str]]:
    """What a DreamBooth run says of its subject (from its difflab.json `training`)."""
    rows = []
    if with_prompt and training.instance_prompt:
        token = training.token
        rows.append(("instance prompt", f"`{training.instance_prompt}`"
                                        + (f" (the subject's token: `{token}`)" if token else "")))
    if training.instance_images is not None:
        prior = (f"; prior preservation on {training.class_images} images of `{training.class_prompt}` "
                 f"(weight {training.prior_loss_weight:g})" if training.class_images else
                 "; no prior preservation")
        rows.append(("DreamBooth", f"{training.instance_images} instance images{prior}"))
    return rows


def _yaml_string(text: str) -> str:
    import json

    return json.dumps(text)  # a JSON string is a YAML string, quotes and all


def set_card_rows(card: str, rows: dict[str, str]) -> str:
    """The card with its first table's rows for `rows`' labels set (replaced, or added at its end)."""
    lines = card.split("\n")
    table = [i for i, line in enumerate(lines) if line.startswith("| ")]
    if not table:
        return card
    end = table[0]
    while end + 1 < len(lines) and lines[end + 1].startswith("|"):
        end += 1
    for label, value in rows.items():
        row = f"| {label} | {value} |"
        found = [i for i in range(table[0], end + 1) if lines[i].startswith(f"| {label} |")]
        if found:
            lines[found[0]] = row
        else:
            end += 1
            lines.insert(end, row)
    return "\n".join(lines)


def textual_inversion_card(name: str, base_model: str, *, token: str, training: TrainingRecord | None = None) -> str:
    """The README.md of a textual inversion folder (`learned_embeds.safetensors`): the token, the base model
    it was learnt on, and how to use it with difflab and with plain diffusers."""
    training = training or TrainingRecord()
    hub_base = is_hub_id(base_model)
    vectors = training.num_vectors or 1
    rows = [("base model", f"`{base_model}`" + ("" if hub_base else " (a local folder)")),
            ("token", f"`{token}` ({vectors} vector{'s' * (vectors > 1)}, started from `{training.init_word}`)"),
            ("learnt from", f"{'?' if training.images is None else training.images} images, "
                            f"{training.what or 'object'} captions")]
    rows += _training_rows(training)
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    front = [("library_name", "diffusers"), ("pipeline_tag", "text-to-image")]
    if hub_base:
        front.append(("base_model", base_model))
    tags = ["text-to-image", "diffusers", "textual_inversion", "difflab"]
    metadata = "\n".join(f"{k}: {v}" for k, v in front) + "\ntags:\n" + "".join(f"- {t}\n" for t in tags)
    prompt = f"a photo of {token}" if training.what != "style" else f"a painting in the style of {token}"
    return f"""---
{metadata}---

# {name}

A textual inversion embedding (a new word for the text encoder) for the text-to-image model `{base_model}`, made
with difflab. Only the token's embedding rows were trained: the model itself is unchanged.

| | |
|---|---|
{table}

## Use

With difflab:

```bash
difflab sample --model {base_model} --embedding "{name}" --prompt "{prompt}" -n 4 --out grid.png
```

With plain diffusers:

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{base_model}")
pipe.load_textual_inversion("{name}")
image = pipe("{prompt}").images[0]
```
"""


def _training_rows(training: TrainingRecord) -> list[tuple[str, str]]:
    """The card's row of how long a run trained (none where the run did not record its steps)."""
    if training.steps is None:
        return []
    on = f", {training.minutes:.1f} minutes on {training.device or '?'}" if training.minutes is not None else ""
    return [("training", f"{training.steps:,} optimizer steps{on}")]
