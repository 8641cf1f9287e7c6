"""What difflab keeps on disk: every file and folder name, and the one answer to "what is at this path"
(a run folder, a model folder, a run's VAE stage, a LoRA, a Stable Diffusion folder, a single file, a
Hub id). Every other module asks here instead of testing names itself.

    runs/NAME/config.toml   metrics.csv   loss.png   samples/   checkpoints/   model/   (vae/  tokenizer/)
    model/    model_index.json + the pipeline's parts (diffusers), difflab.json, README.md
              or pytorch_lora_weights.safetensors + README.md (a LoRA run)
              or scratch.json + weights (the from-scratch teaching model)
"""

from __future__ import annotations

import enum
import json
import re
import shlex
from pathlib import Path

from difflab.errors import ModelError

INFO_FILE = "difflab.json"  # what a model is and was made from, beside its weights
SCRATCH_INFO_FILE = "scratch.json"  # the teaching model's description (models/scratch_model.py)
CARD = "README.md"
MODEL_INDEX = "model_index.json"  # a diffusers pipeline folder names its class and parts here
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LORA_PICKLE = "pytorch_lora_weights.bin"  # diffusers' LORA_WEIGHT_NAME (older runs)
EMBEDDING_FILE = "learned_embeds.safetensors"  # a textual inversion; diffusers' TEXT_INVERSION_NAME_SAFE
EMBEDDING_PICKLE = "learned_embeds.bin"  # diffusers' TEXT_INVERSION_NAME
CONDITIONING_FILE = "conditioning.safetensors"  # weights of a difflab denoiser outside its UNet
SCRATCH_WEIGHTS = "basic_unet.safetensors"  # the teaching model's weights
SAFETENSORS = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")  # weights that unpickling would read
WEIGHT_SUFFIXES = (SAFETENSORS, *PICKLE_SUFFIXES)

# A run folder (training/run_folder.py writes it)
RUN_CONFIG = "config.toml"
RUN_METRICS = "metrics.csv"
RUN_LOSS_PLOT = "loss.png"
RUN_SAMPLES = "samples"
RUN_CHECKPOINTS = "checkpoints"
RUN_MODEL = "model"
VAE_STAGE = "vae"  # a text run's VAE stage: a run folder of its own, without config.toml
TOKENIZER = "tokenizer"  # learnt from a text run's captions before training

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")  # owner/name, as the Hub takes them


class Kind(enum.Enum):
    """What `what_is_at` finds; the value is how a message names it."""

    RUN = "a run folder"  # config.toml and its finished model/ (a model folder)
    LORA_RUN = "a LoRA run folder"  # config.toml and model/ holding pytorch_lora_weights.safetensors
    UNFINISHED_RUN = "a run folder with no model/ yet"
    VAE_STAGE = "the VAE stage of a run"
    SD_FOLDER = "a Stable Diffusion folder"  # model_index.json naming a StableDiffusion* pipeline
    MODEL = "a model folder"  # another diffusers pipeline, a pixel-space text model's parts, a bare UNet
    SCRATCH_MODEL = "a from-scratch teaching model folder"
    LORA_FOLDER = "a LoRA folder"  # holds pytorch_lora_weights.safetensors (a LoRA run's model/)
    LORA_FILE = f"a LoRA file ({LORA_WEIGHTS})"  # or its .bin
    SINGLE_FILE = "a single-file checkpoint"  # any other .safetensors or pickle file
    HUB_ID = "a Hugging Face Hub id"
    FOLDER = "a folder"  # none of the above
    FILE = "a file"
    NOTHING = "nothing"  # no such path, and not a Hub id


RUNS = (Kind.RUN, Kind.LORA_RUN, Kind.UNFINISHED_RUN)
LORAS = (Kind.LORA_FILE, Kind.LORA_FOLDER, Kind.LORA_RUN, Kind.HUB_ID)  # what --lora takes
MODEL_FOLDERS = (Kind.SD_FOLDER, Kind.MODEL, Kind.SCRATCH_MODEL)


def is_hub_id(value) -> bool:
    """owner/name in the Hub's spelling, and not a path here (a local folder or file of that name wins,
    and a missing weights file is a missing file, not a repo)."""
    if not isinstance(value, str) or not HUB_ID.match(value) or ".." in value:
        return False
    return not value.lower().endswith(WEIGHT_SUFFIXES) and not Path(value).exists()


def is_run_folder(path: str | Path) -> bool:
    """A folder a training run made (finished or not): it holds the run's config.toml."""
    return (Path(path) / RUN_CONFIG).is_file()


def run_of(model_folder: str | Path) -> Path | None:
    """The run folder whose model/ `model_folder` is, or None."""
    folder = Path(model_folder)
    return folder.parent if folder.name == RUN_MODEL and is_run_folder(folder.parent) else None


def what_is_at(spec: str | Path) -> Kind:
    """What the path (or Hub id) `spec` holds, judged by difflab's and diffusers' file names alone."""
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        return _folder_kind(path)
    if path.is_file():
        if path.name in (LORA_WEIGHTS, LORA_PICKLE):
            return Kind.LORA_FILE
        return Kind.SINGLE_FILE if path.suffix.lower() in WEIGHT_SUFFIXES else Kind.FILE
    return Kind.HUB_ID if is_hub_id(str(spec)) else Kind.NOTHING


def _folder_kind(path: Path) -> Kind:
    if is_run_folder(path):
        model = path / RUN_MODEL
        if not model.is_dir():
            return Kind.UNFINISHED_RUN
        return Kind.LORA_RUN if (model / LORA_WEIGHTS).is_file() else Kind.RUN
    if path.resolve().name == VAE_STAGE and is_run_folder(path.resolve().parent):
        return Kind.VAE_STAGE
    if (path / LORA_WEIGHTS).is_file():
        return Kind.LORA_FOLDER
    if (path / MODEL_INDEX).is_file():
        name = json_or_empty(path / MODEL_INDEX).get("_class_name")
        return Kind.SD_FOLDER if isinstance(name, str) and name.startswith("StableDiffusion") else Kind.MODEL
    if (path / SCRATCH_INFO_FILE).is_file():
        return Kind.SCRATCH_MODEL
    if (path / "unet" / "config.json").is_file() or "block_out_channels" in json_or_empty(path / "config.json"):
        return Kind.MODEL  # a pixel-space text model's parts, or a bare UNet folder
    return Kind.FOLDER


def expect(spec: str | Path, kinds, error: type[Exception] = ModelError, flag: str = "") -> Kind:
    """What is at `spec`, which must be one of `kinds`; else `error` in one line naming what was found and
    what was expected (`flag`, such as "--model", starts it)."""
    found = what_is_at(spec)
    if found in kinds:
        return found
    wanted = [k.value for k in dict.fromkeys(kinds)]
    listed = ", ".join(wanted[:-1]) + (" or " if len(wanted) > 1 else "") + wanted[-1]
    where = f"{flag} {spec}" if flag else str(spec)
    if found is Kind.NOTHING:
        raise error(f"{where} does not exist; give {listed}")
    if found is Kind.UNFINISHED_RUN:
        raise error(unfinished_run(Path(str(spec)).expanduser()))
    raise error(f"{where} is {found.value}, not {listed}")


def local_model_folder(spec: str | Path) -> Path:
    """A local model folder, or the model/ of a run folder; an unfinished run, or a text run's VAE stage,
    is a one-line error that says how to finish the run."""
    path = Path(spec).expanduser()
    kind = what_is_at(path)
    if kind in (Kind.RUN, Kind.LORA_RUN):
        return path / RUN_MODEL
    if kind is Kind.UNFINISHED_RUN:
        raise ModelError(unfinished_run(path))
    if kind is Kind.VAE_STAGE:
        run = path.parent
        if (run / RUN_MODEL).is_dir():
            raise ModelError(f"{spec} is the VAE stage of the run {run}, not a diffusion model; give the run's "
                             f"model: {run / RUN_MODEL}")
        raise ModelError(f"{spec} is the VAE stage of the run {run}, not a diffusion model; {unfinished_run(run)}")
    if path.is_dir():
        return path
    if path.exists():
        raise ModelError(f"{spec} is a file; give the model folder that holds it")
    raise ModelError(f"model folder {spec} does not exist")


def unfinished_run(folder: Path, consequence: str = "") -> str:
    """'FOLDER is a run folder …': what a run folder without a model/ is (and `consequence`, such as ", so
    there is nothing to push yet"), and, last, the command that finishes it, ready to paste
    (the one that made it: dreambooth for a DreamBooth run, else train, which takes every other run's
    config.toml): --resume once it has a checkpoint or a finished stage, its config.toml again if it never
    trained a step (a resume would be refused)."""
    try:
        settings = (folder / RUN_CONFIG).read_text(encoding="utf-8", errors="replace")
    except OSError:
        settings = ""
    command = "dreambooth" if re.search(r"^\[dreambooth\]", settings, re.M) else "train"
    started = (any((folder / RUN_CHECKPOINTS).glob("step_*"))
               or any((folder / VAE_STAGE / RUN_CHECKPOINTS).glob("step_*"))
               or (folder / VAE_STAGE / RUN_MODEL / "config.json").is_file())
    quoted = shlex.quote(str(folder))
    if started:
        return (f"{folder} is a run folder whose training has not finished (no model/ yet){consequence}; finish it "
                f"with: difflab {command} --out {quoted} --resume")
    return (f"{folder} is a run folder that never trained a step (no model/ yet){consequence}; start it with: "
            f"difflab {command} --config {shlex.quote(str(folder / RUN_CONFIG))} --out {quoted}")


def json_or_empty(path: Path) -> dict:
    """A JSON file's object, or {} where it is missing, unreadable or not an object (a question, not a load)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
