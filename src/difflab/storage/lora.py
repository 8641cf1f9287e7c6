"""LoRA files: written in the diffusers LoRA format, found, checked against a model, and applied.

`save_lora` writes a model's adapters (`models/lora.py`) as `pytorch_lora_weights.safetensors`, through
diffusers' own `save_lora_weights`, which `StableDiffusionPipeline.load_lora_weights` accepts.

`apply_lora(model, spec, scale)` loads such a file (difflab's, diffusers', or a kohya/A1111 one that
diffusers converts) onto a loaded model: diffusers' `load_lora_weights` runs on `to_pipeline(model)`,
whose UNet and text encoder *are* the model's, so formats and conversions are exactly diffusers'.
Each file is one named adapter; several combine as peft combines them (`set_adapters` with one weight
each).

Before anything is loaded, the file is checked against the model: a file that is not a LoRA, or whose
layers are missing from this model or have other widths (a LoRA made for another base model), is a
one-line `ModelError` that names the layers that do not fit, and the model is left as it was; so is
one whose values are damaged (NaN, infinite or absurd: `models/weights.py`), named as damaged.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from difflab.errors import ConfigError, ModelError
from difflab.files import atomic_folder
from difflab.layout import (
    LORA_PICKLE,
    LORA_WEIGHTS,
    LORAS,
    MODEL_INDEX,
    PICKLE_SUFFIXES,
    RUN_MODEL,
    Kind,
    expect,
    what_is_at,
)
from difflab.models.lora import (
    DEFAULT_ADAPTER,
    adapted_networks,
    adapter_weights,
    check_attention,
    check_scale,
    layer_width,
    lora_state_dicts,
)
from difflab.models.model import DiffusionModel
from difflab.models.weights import check_weights
from difflab.storage.pickles import load_pickled_weights
from difflab.storage.quiet import quiet_diffusers

log = logging.getLogger("difflab")


# ---- writing ---------------------------------------------------------------------------------------

def save_lora(model: DiffusionModel, folder: str | Path, *, name: str = DEFAULT_ADAPTER, card: str | None = None
              ) -> Path:
    """Write adapter `name` as `folder/pytorch_lora_weights.safetensors` (diffusers' LoRA format, with
    each network's LoraConfig in the file's metadata so that rank and alpha load back exactly), and the
    model card as README.md. The folder is replaced only once complete; returns the weights file."""
    from diffusers import StableDiffusionPipeline

    layers = lora_state_dicts(model, name)
    if not layers:
        raise ModelError(f"this model has no LoRA adapter named {name!r} to save")
    networks = adapted_networks(model)
    metadata = {f"{part}_lora_adapter_metadata": networks[part].peft_config[name].to_dict() for part in layers}
    folder = Path(folder)
    with atomic_folder(folder) as partial:
        with quiet_diffusers():
            StableDiffusionPipeline.save_lora_weights(
                partial, unet_lora_layers=layers.get("unet"), text_encoder_lora_layers=layers.get("text_encoder"),
                safe_serialization=True, **metadata)
        if card is not None:
            (partial / "README.md").write_text(card, encoding="utf-8")
    return folder / LORA_WEIGHTS


# ---- loading LoRA files ----------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraSource:
    """Where a LoRA's weights are: a local file, or a Hub repo (fetched by diffusers)."""

    spec: str  # as the user gave it
    file: Path | None = None  # a local file
    repo_id: str | None = None  # a Hub id
    pickle: bool = False

    @property
    def label(self) -> str:
        return str(self.file) if self.file is not None else self.repo_id


def resolve_lora(spec: str | Path, *, allow_pickle: bool = False) -> LoraSource:
    """A LoRA file; a folder holding one (`pytorch_lora_weights.safetensors`, or its only .safetensors
    file); a run folder (its model/); or a Hub id. Checked before any model is loaded."""
    path = Path(spec).expanduser()
    kind = what_is_at(spec)
    if kind is Kind.HUB_ID:
        return LoraSource(str(spec), repo_id=str(spec))
    if path.is_dir():
        if kind in (Kind.RUN, Kind.LORA_RUN):
            path = path / RUN_MODEL
        path = _lora_file_in(path, spec)
    elif kind is Kind.NOTHING:
        expect(spec, LORAS, flag="LoRA")
    if path.suffix == ".safetensors":
        return LoraSource(str(spec), file=path)
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelError(f"{path} is a pickle, and unpickling can run code hidden in it: convert it to "
                             "safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)")
        return LoraSource(str(spec), file=path, pickle=True)
    raise ModelError(f"{path} is not a LoRA file: LoRA weights are .safetensors files ({LORA_WEIGHTS})")


def _lora_file_in(folder: Path, spec) -> Path:
    if (folder / LORA_WEIGHTS).is_file():
        return folder / LORA_WEIGHTS
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".safetensors")
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise ModelError(f"{spec} holds several .safetensors files ({names}) and no {LORA_WEIGHTS}; give the "
                         "LoRA file itself")
    pickled = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if (folder / LORA_PICKLE).is_file() or len(pickled) == 1:
        return folder / LORA_PICKLE if (folder / LORA_PICKLE).is_file() else pickled[0]
    what = "a model folder" if (folder / MODEL_INDEX).is_file() else "a folder"
    raise ModelError(f"{spec} is {what} with no LoRA file ({LORA_WEIGHTS}); give a LoRA file, or the folder or run "
                     "folder that holds one")


def apply_lora(model: DiffusionModel, spec: str | Path, scale: float = 1.0, *, allow_pickle: bool = False,
               name: str | None = None) -> str:
    """Load the LoRA at `spec` (see `resolve_lora`) onto `model` as a new adapter of weight `scale`;
    adapters already applied stay, with their weights. Returns the adapter's name."""
    source = spec if isinstance(spec, LoraSource) else resolve_lora(spec, allow_pickle=allow_pickle)
    scale = check_scale(scale)
    check_attention(model)
    pipe = lora_pipeline(model)
    weights = adapter_weights(model)
    name = name or f"lora_{len(weights)}"
    if name in weights:
        raise ModelError(f"this model already has a LoRA adapter named {name!r}")
    state_dict, kwargs = _read(pipe, source)
    check_fits(model, state_dict, source.label)
    check_weights(state_dict, source.label)  # NaN or infinite weights would give black images, with exit 0
    with quiet_diffusers(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Already found a `peft_config`")  # peft's note on a second adapter
        try:
            pipe.load_lora_weights(state_dict if source.pickle else _where(source), adapter_name=name, **kwargs)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            _remove_adapter(pipe, name)
            raise ModelError(f"cannot apply the LoRA {source.label} ({_first_line(e)})") from None
        weights[name] = scale
        pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
    log.info("LoRA %s applied with weight %g", source.label, scale)
    return name


def plan_loras(specs: list, scales: list[float] | None = None, *, allow_pickle: bool = False
               ) -> list[tuple[LoraSource, float]]:
    """`--lora A --lora B --lora-scale SA SB`: each LoRA found and given its weight (one weight for all,
    or one per LoRA in order; default 1), before any model is loaded."""
    scales = [check_scale(s) for s in scales] if scales else [1.0]
    if len(scales) == 1:
        scales = scales * len(specs)
    if len(scales) != len(specs):
        raise ConfigError(f"--lora-scale gives {len(scales)} weights for {len(specs)} LoRAs; give one weight, or one "
                          "per --lora in the same order")
    sources = [s if isinstance(s, LoraSource) else resolve_lora(s, allow_pickle=allow_pickle) for s in specs]
    return list(zip(sources, scales))


def apply_loras(model: DiffusionModel, plan: list[tuple[LoraSource, float]]) -> list[str]:
    """Apply each (LoRA, weight) of `plan_loras`; returns the adapters' names."""
    return [apply_lora(model, source, scale) for source, scale in plan]


def set_lora_weights(model: DiffusionModel, weights: dict[str, float]) -> None:
    """Change the weights of applied adapters ({name: weight}; the others keep theirs)."""
    current = adapter_weights(model)
    unknown = sorted(set(weights) - set(current))
    if unknown:
        raise ModelError(f"no LoRA adapter named {', '.join(unknown)}; this model has {', '.join(current) or 'none'}")
    current.update({k: check_scale(v) for k, v in weights.items()})
    with quiet_diffusers():
        lora_pipeline(model).set_adapters(list(current), adapter_weights=list(current.values()))


def use_lora(model: DiffusionModel, name: str | None, scale: float = 1.0) -> None:
    """Make adapter `name` the only active one, with weight `scale`; None: no adapter (the base model). The
    others stay loaded: the demo switches between LoRAs per request this way, without reading files again."""
    pipe = lora_pipeline(model)
    with quiet_diffusers():
        if name is None:
            pipe.disable_lora()
            return
        if name not in adapter_weights(model):
            raise ModelError(f"no LoRA adapter named {name!r}; this model has {', '.join(adapter_weights(model))}")
        pipe.enable_lora()
        pipe.set_adapters([name], adapter_weights=[check_scale(scale)])


def lora_pipeline(model: DiffusionModel):
    """The diffusers pipeline around the model's own modules: diffusers' LoRA loader works on it."""
    from difflab.storage.stable_diffusion import to_pipeline

    with quiet_diffusers():
        return to_pipeline(model)


def _where(source: LoraSource) -> str:
    """What diffusers' loaders take: the file's folder (with `weight_name`), or the Hub id."""
    return str(source.file.parent) if source.file is not None else source.repo_id


def _read(pipe, source: LoraSource) -> tuple[dict, dict]:
    """The LoRA's tensors as diffusers reads them (kohya/A1111 names converted), and the keyword
    arguments that make `load_lora_weights` read the same file the same way."""
    from safetensors import SafetensorError

    if source.pickle:
        state = load_pickled_weights(source.file)
        with quiet_diffusers():
            try:
                return pipe.lora_state_dict(dict(state))[0], {}
            except (ValueError, KeyError, RuntimeError) as e:
                raise ModelError(f"{source.file} is not a LoRA diffusers can read ({_first_line(e)})") from None
    from huggingface_hub import constants

    kwargs = {"use_safetensors": True}
    if source.file is not None:
        kwargs["weight_name"] = source.file.name
    elif constants.is_offline_mode():  # diffusers cannot list an offline repo's files: take the usual name
        kwargs["weight_name"] = LORA_WEIGHTS
    try:
        with quiet_diffusers():
            state = pipe.lora_state_dict(_where(source), **kwargs)[0]
    except (OSError, SafetensorError, ValueError, KeyError, RuntimeError) as e:
        if source.repo_id:
            raise ModelError(f"{source.repo_id} is neither a LoRA here nor one that could be fetched from the Hugging "
                             f"Face Hub ({_first_line(e)}); check the path, or the Hub id and your connection"
                             ) from None
        raise ModelError(f"cannot read the LoRA file {source.file} ({_first_line(e)}); the file may be damaged"
                         ) from None
    return state, kwargs


def check_fits(model: DiffusionModel, state_dict: dict, label: str) -> None:
    """Every layer of the LoRA must exist in this model with the widths the LoRA was made for."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    lora_keys = [k for k in state_dict if "lora" in k]
    if not state_dict or len(lora_keys) < len(state_dict) / 2:
        raise ModelError(f"{label} holds no LoRA weights (its tensors are not named as LoRA layers); is it a full "
                         "model's weights file?")
    networks = {"unet": model.unet, "text_encoder": model.prompts.text_encoder}
    problems, layers = [], 0
    other = sorted({k.split(".")[0] for k in state_dict if k.split(".")[0] not in networks})
    if other:
        problems.append(f"{', '.join(other)} (not part of a Stable Diffusion 1.x/2.x model)")
    for part, network in networks.items():
        own = {k.removeprefix(f"{part}."): v for k, v in state_dict.items() if k.startswith(f"{part}.")}
        if not own:
            continue
        if part == "unet":  # as diffusers' load_lora_adapter / _load_lora_into_text_encoder convert them
            own = own if "lora_A" in next(iter(own)) else convert_unet_state_dict_to_peft(own)
        else:
            own = convert_state_dict_to_peft(convert_state_dict_to_diffusers(own))
            if not hasattr(network, "text_model"):
                own = {k.removeprefix("text_model."): v for k, v in own.items()}
        modules = dict(network.named_modules())
        pairs: dict[str, dict] = {}  # layer -> {"A": down weight, "B": up weight}
        for key, tensor in own.items():
            found = re.match(r"(.+)\.lora_([AB])\.weight$", key)
            if found:
                pairs.setdefault(found[1], {})[found[2]] = tensor
        for layer, sides in pairs.items():
            layers += 1
            module = modules.get(layer)
            if module is None:
                problems.append(f"{part}.{layer} (not in this model)")
                continue
            want = (layer_width(module, "A"), layer_width(module, "B"))
            have = (sides["A"].shape[1] if "A" in sides else None, sides["B"].shape[0] if "B" in sides else None)
            if None not in want and any(h is not None and h != w for h, w in zip(have, want)):
                problems.append(f"{part}.{layer} ({have[0]}→{have[1]} wide in the LoRA, {want[0]}→{want[1]} in "
                                "the model)")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ModelError(f"{label} does not fit this model (made for another base model?): {len(problems)} of its "
                         f"{layers} layers do not fit: {shown}")


def _remove_adapter(pipe, name: str) -> None:
    try:
        pipe.delete_adapters(name)
    except Exception:  # noqa: BLE001 - nothing was added, or only part: either way the original error is what counts
        pass


def _first_line(error: Exception, limit: int = 300) -> str:
    """The error's text on one line (diffusers puts the names that matter on the lines after the first)."""
    text = " ".join(str(error).split())
    return (text if len(text) <= limit else text[:limit - 3] + "...") or type(error).__name__


