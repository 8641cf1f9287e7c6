"""DreamBooth (course unit 3): teach a text-to-image model a subject from a few images.

Not a loop of its own: a DreamBooth run is the one Trainer fine-tuning a text-to-image model (`--from`)
on data made here (a `DataMaker`): the instance images captioned with the instance prompt ("a photo of
sks dog"), and, with prior preservation, class images captioned with the class prompt ("a photo of
dog") in a second loss group weighted by `prior_loss_weight`. Class images come from `--class-data`, or
are generated once by the base model through the one sampler and kept in the run folder
(`class_images/`), so a resumed run reuses them. What trains (every UNet weight, the text encoder too,
or LoRA adapters) is the model section's choice, as for any fine-tuning run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from difflab.config import DREAMBOOTH_LR_FRACTION, STABLE_DIFFUSION_LR, DreamBoothConfig
from difflab.data.dataset import ImageDataset, LossGroups
from difflab.errors import ConfigError, DataError
from difflab.models.model import DiffusionModel, TrainingRecord
from difflab.training.run_folder import RunFolder

log = logging.getLogger("difflab")

CLASS_IMAGES = "class_images"  # in the run folder
MOST_INSTANCE_IMAGES = 1000  # refused above: that is fine-tuning on a data set, not DreamBooth
MANY_INSTANCE_IMAGES = 200  # warned above
# In a BPE vocabulary learnt from a web corpus (CLIP's 49,408 tokens), merges are ordered by frequency and
# the last tenth are rare strings such as "sks"; in a small one learnt from a data set's captions, every
# whole-word token is a word of the captions.
LARGE_VOCABULARY = 10_000
RARE_TAIL = 0.9
CLASS_BATCH = 16  # the most class images generated per call


# ---- settings ------------------------------------------------------------------------------------

def check_settings(config: DreamBoothConfig) -> DreamBoothConfig:
    """The DreamBooth settings that must be given, and prior preservation's class prompt or images;
    returns the config with the data spec naming the instance folder (for config.toml and the card)."""
    d = config.dreambooth
    if not config.model.base:
        raise ConfigError("give the text-to-image model to teach with --model (a Stable Diffusion folder, a difflab "
                          "text-to-image run or model folder, or a Hub id)")
    if not d.instance_data:
        raise ConfigError("give the subject's images with --instance-data FOLDER")
    if not (d.instance_prompt or "").strip():
        raise ConfigError('give the prompt that names the subject with --instance-prompt, such as "a photo of sks dog"')
    if d.prior_preservation and not (d.class_prompt or d.class_data):
        raise ConfigError('--prior-preservation needs the class: give --class-prompt (such as "a photo of dog") to '
                          "generate class images, or --class-data FOLDER")
    count_images(d.instance_data, "--instance-data")  # before the base model loads and the run folder is written
    if d.prior_preservation and d.class_data:
        count_images(d.class_data, "--class-data")
    return dataclasses.replace(config, data=dataclasses.replace(config.data, spec=d.instance_data))


def default_lr(base_training: TrainingRecord, lora: bool) -> float:
    """DreamBooth's learning rate for a base model trained at `base_training.lr` (difflab.json;
    Stable Diffusion's 1e-4 when it does not say): 1/20 of it for a full fine-tune, as much for LoRA."""
    pretrained = base_training.lr or STABLE_DIFFUSION_LR
    return float(f"{pretrained * DREAMBOOTH_LR_FRACTION['lora' if lora else 'full']:.3g}")


def base_training_info(spec: str) -> TrainingRecord:
    """What the base model's difflab.json says of its training (nothing for a folder difflab did not make)."""
    from difflab.layout import INFO_FILE
    from difflab.storage.folder import resolve_model_folder
    from difflab.storage.single_file import carried_info, is_single_file

    if is_single_file(spec):  # difflab's exports carry their difflab.json; other single files say nothing
        return TrainingRecord.from_json(carried_info(spec).get("training"))
    path = resolve_model_folder(spec) / INFO_FILE
    if not path.is_file():
        return TrainingRecord()
    try:
        return TrainingRecord.from_json(json.loads(path.read_text(encoding="utf-8")).get("training"))
    except (OSError, ValueError, AttributeError):
        return TrainingRecord()


# ---- the subject's token ---------------------------------------------------------------------------

def subject_words(instance_prompt: str, class_prompt: str | None) -> list[str]:
    """The words of the instance prompt that name the subject: those the class prompt does not have."""
    words = re.findall(r"[\w'-]+", instance_prompt.lower())
    known = set(re.findall(r"[\w'-]+", (class_prompt or "").lower()))
    return [w for w in words if w not in known] if class_prompt else words


def common_word(word: str, tokenizer) -> int | None:
    """The token id of `word` when the tokenizer holds it whole and it is not in the rare tail of a large
    vocabulary; None for a rare word, or one the tokenizer splits into pieces (a string it has not learnt
    as a word, which is what a subject's token should be)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        return None
    size = len(tokenizer)
    return None if size >= LARGE_VOCABULARY and ids[0] >= RARE_TAIL * size else ids[0]


def check_token(instance_prompt: str, class_prompt: str | None, tokenizer) -> str | None:
    """The subject's token (the first subject word that is not a frequent token), or None after a warning
    that says how the tokenizer splits the prompt: training would rewrite a word the model knows."""
    words = subject_words(instance_prompt, class_prompt)
    rare = [word for word in words if common_word(word, tokenizer) is None]
    if len(rare) == 1 or (rare and class_prompt):
        return rare[0]
    if rare:  # no class prompt, and several words new to the tokenizer ("photo", "sks", "star" to a small one)
        order = re.findall(r"[\w'-]+", instance_prompt.lower())
        if len(order) >= 2 and order[-2] in rare:
            return order[-2]  # DreamBooth's "[token] [class noun]": the word before the last
        log.warning("the instance prompt %r has several words the tokenizer does not know (%s), and which names the "
                    "subject cannot be told; give --class-prompt (the prompt without the token) so that it can",
                    instance_prompt, ", ".join(rare))
        return None
    pieces = [tokenizer.convert_ids_to_tokens(tokenizer(w, add_special_tokens=False).input_ids)
              for w in re.findall(r"[\w'-]+", instance_prompt.lower())]
    split = ", ".join(" + ".join(p) for p in pieces)
    if words:
        why = (f"{', '.join(repr(w) for w in words)} {'is a' if len(words) == 1 else 'are'} common "
               f"token{'s' * (len(words) > 1)} of the tokenizer, so training would change what "
               f"{'it means' if len(words) == 1 else 'they mean'} everywhere")
    else:
        why = "every word is in the class prompt too, so nothing names the subject"
    log.warning("the instance prompt %r has no rare token for the subject (the tokenizer reads it as %s): %s; put a "
                "rare word such as 'sks' before the class noun", instance_prompt, split, why)
    return None


# ---- images ------------------------------------------------------------------------------------------

def count_images(folder: str, what: str, task: str = "DreamBooth") -> int:
    """The number of image files under `folder` (given as the flag `what`), with one-line errors for a
    missing folder or none."""
    from difflab.data.decode import IMAGE_EXTENSIONS
    from difflab.data.folder import list_images

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"{what} folder {folder} does not exist")
    count = len(list_images(root).files)
    if count < 1:
        raise DataError(f"no images in {what} folder {folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                        f"{task} needs at least 1, and 3 to 5 is typical")
    return count


def instance_images(folder: str, image_size: int) -> torch.Tensor:
    """The subject's images as uint8 [N, 3, size, size]; unreadable files are skipped (with a warning),
    a folder without readable images is an error, and so is one far too large for DreamBooth."""
    from difflab.data.folder import load_folder

    count = count_images(folder, "--instance-data")
    if count > MOST_INSTANCE_IMAGES:
        raise DataError(f"--instance-data {folder} holds {count} images, more than the {MOST_INSTANCE_IMAGES} "
                        "DreamBooth takes (it teaches a subject from a few); to learn from a data set use "
                        "difflab finetune --from MODEL --data FOLDER")
    if count > MANY_INSTANCE_IMAGES:
        log.warning("--instance-data %s holds %d images; DreamBooth is meant for a few (3 to 5 is typical): with "
                    "this many, difflab finetune on captioned data may suit better", folder, count)
    data = load_folder(folder, image_size, 3, "all", memory_limit_mb=1 << 30)
    return data.images


def class_images(config: DreamBoothConfig, base: DiffusionModel, run: RunFolder) -> torch.Tensor:
    """`num_class_images` class images: from --class-data, topped up by images the base model generates
    from the class prompt (image i with seed `run.seed + i`), which are kept as class_images/NNNN.png in
    the run folder and reused by later starts and resumes."""
    d, size = config.dreambooth, base.info.image_size
    want = d.num_class_images
    given = torch.zeros(0, 3, size, size, dtype=torch.uint8)
    if d.class_data:
        count_images(d.class_data, "--class-data")
        from difflab.data.folder import load_folder

        given = load_folder(d.class_data, size, 3, "all", memory_limit_mb=1 << 30).images[:want]
    if len(given) >= want:
        return given
    folder = run.root / CLASS_IMAGES
    folder.mkdir(exist_ok=True)
    cached = sorted(folder.glob("[0-9][0-9][0-9][0-9].png"))
    missing = want - len(given) - len(cached)
    if missing > 0:
        generate_class_images(config, base, folder, start=len(cached), count=missing)
    from difflab.data.decode import read_image_array

    files = sorted(folder.glob("[0-9][0-9][0-9][0-9].png"))[:want - len(given)]
    made = torch.from_numpy(np.stack([read_image_array(f, size, 3) for f in files]))
    return torch.cat([given, made])


def generate_class_images(config: DreamBoothConfig, base: DiffusionModel, folder: Path, *, start: int,
                          count: int) -> None:
    """Class images from the base model, before any training, through difflab's one sampler: on the run's
    device, in its precision, at most CLASS_BATCH at a time and fewer where the VAE's decoder needs the
    memory (each image still depends only on its seed)."""
    from difflab.batch_memory import vae_batch
    from difflab.devices import pick_device
    from difflab.diffusion.generate import generate
    from difflab.diffusion.request import GenerationRequest
    from difflab.images import save_png, to_pil

    d, run = config.dreambooth, config.run
    log.info("generating %d class images of %r with the base model into %s", count, d.class_prompt, folder)
    started = time.perf_counter()
    device = pick_device(run.device)
    base.to(device)
    size = base.info.image_size
    dtype = torch.float32 if config.optim.precision == "no" else torch.float16
    batch = vae_batch(size, size, dtype, device, CLASS_BATCH, decode=True)
    request = GenerationRequest(count, sampler=run.sample_sampler, steps=run.sample_steps, seed=run.seed + start,
                                prompts=d.class_prompt, precision=config.optim.precision)
    images = generate(base, request, batch_size=batch, progress=True)
    for i, image in enumerate(images):
        save_png(to_pil(image), folder / f"{start + i:04d}.png", request.settings(base, image=i))
    log.info("class images generated in %.0f s", time.perf_counter() - started)


# ---- the run's data ---------------------------------------------------------------------------------

def make_data(config: DreamBoothConfig, base: DiffusionModel, run: RunFolder) -> ImageDataset:
    """The instance images with the instance prompt and, with prior preservation, the class images with
    the class prompt. Instance images are repeated to as many as the class images, so that a batch holds
    as many of each on average, as diffusers' DreamBooth dataset pairs them."""
    d = config.dreambooth
    if base.prompts is None:
        raise DataError(f"{config.model.base} has no text encoder: DreamBooth teaches text-to-image models")
    token = check_token(d.instance_prompt, d.class_prompt, base.prompts.tokenizer)
    instances = instance_images(d.instance_data, base.info.image_size)
    notes = {"instance_prompt": d.instance_prompt, "token": token, "instance_images": len(instances)}
    if not d.prior_preservation:
        groups = LossGroups(torch.zeros(len(instances), dtype=torch.int64), ("instance",), (1.0,))
        return ImageDataset(instances, source=d.instance_data, captions=[d.instance_prompt] * len(instances),
                            loss_groups=groups, notes=notes)
    class_prompt = d.class_prompt or class_prompt_of(d.instance_prompt, token)
    classes = class_images(config, base, run)
    repeats = max(1, -(-len(classes) // len(instances)))
    instances = instances.repeat(repeats, 1, 1, 1)[:max(len(instances), len(classes))]
    index = torch.cat([torch.zeros(len(instances)), torch.ones(len(classes))]).long()
    notes.update(class_prompt=class_prompt, class_images=len(classes), prior_loss_weight=d.prior_loss_weight)
    return ImageDataset(torch.cat([instances, classes]), source=d.instance_data,
                        captions=[d.instance_prompt] * len(instances) + [class_prompt] * len(classes),
                        loss_groups=LossGroups(index, ("instance", "prior"), (1.0, d.prior_loss_weight)), notes=notes)


def class_prompt_of(instance_prompt: str, token: str | None) -> str:
    """The class images' caption when only --class-data is given: the instance prompt without its token."""
    if token is None:
        return instance_prompt
    return " ".join(w for w in instance_prompt.split() if w.lower().strip(".,") != token)


# ---- the command ------------------------------------------------------------------------------------

def dreambooth(config: DreamBoothConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
               clock: Callable[[], float] = time.perf_counter, yes: bool = False) -> Path:
    """Teach the base model (`config.model.base`) the subject; returns the saved model folder (a Stable
    Diffusion folder, or for LoRA a folder with pytorch_lora_weights.safetensors). The one training run
    with DreamBooth's data maker: nothing of the loop or of its ending is here."""
    from difflab.training.trainer import train

    return train(check_settings(config), out, resume=resume, overwrite=overwrite, clock=clock, yes=yes,
                 data=make_data)
