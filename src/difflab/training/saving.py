"""What a denoiser run says of itself and saves: the training record (difflab.json's `training`, which
the model card shows too) and the run's model (a model folder, a LoRA file, or a trained part's file)."""

from __future__ import annotations

from pathlib import Path

from difflab.config import TrainConfig, dumps_config
from difflab.models.model import TrainingRecord
from difflab.storage.card import model_card
from difflab.storage.folder import save_model
from difflab.training import finetune
from difflab.training.steps import TrainState


def record_training(model, config: TrainConfig, *, data=None, text=None, state: TrainState | None = None,
                    device: str | None = None, **measured) -> None:
    """The one place that writes `model.info.training`. Given the run's `data` (and `text` parts), at the
    start: what the run is (images, preset, conditioning dropout, text parts, LoRA rank, timestep shift and
    what made data says of itself). Given the final `state`, when the model is saved: what it did (steps,
    images, minutes, device, moving-average decay, learning rate) and the `measured` figures (the split of
    --minutes)."""
    if data is not None:
        training = model.info.training = TrainingRecord(images=len(data))
        if config.model.preset != finetune.BASE_PRESET:
            training.preset = config.model.preset
        if model.class_names or text:
            training.cond_dropout = config.model.cond_dropout
        if text:
            training.update(text.training_rows(config, data))
        if config.model.lora_rank:
            training.lora_rank = config.model.lora_rank
        if config.optim.timestep_shift != 1:
            training.timestep_shift = config.optim.timestep_shift
        training.update(getattr(data, "notes", None) or {})  # what made data says of itself (DreamBooth's prompts)
    if state is not None:
        model.info.training.update(
            steps=state.step, images_seen=state.images_seen, minutes=round(state.seconds / 60, 2),
            device=device, ema_decay=config.optim.ema_decay, lr=config.optim.lr, **measured)


def save_run_model(model, config: TrainConfig, folder: Path, part=None, prompt: str | None = None) -> None:
    """The run's model into `folder`: what a trained part saves, the LoRA adapters, or the model folder
    with its card. `prompt`: a text model's first validation prompt (the LoRA card's example)."""
    if part is not None:
        part.save(folder, model)
    elif config.model.lora_rank:
        save_lora_run(model, config, folder, prompt)
    else:
        save_model(model, folder, model_card(model, str(folder), dumps_config(config)))


def save_lora_run(model, config: TrainConfig, folder: Path, prompt: str | None) -> None:
    """A LoRA run's model: only the adapters, as pytorch_lora_weights.safetensors, with its card."""
    from difflab.models.lora import lora_summary
    from difflab.storage.card import lora_card
    from difflab.storage.lora import save_lora

    training = model.info.training
    summary = lora_summary(model)
    card = lora_card(str(folder), str(config.model.base), rank=summary["rank"],
                     alpha=summary["alpha"], targets=summary["targets"], parameters=summary["parameters"],
                     instance_prompt=training.instance_prompt, token=training.token,
                     prompt=prompt, data=model.info.data, training=training)
    save_lora(model, folder, card=card)


def time_split(state: TrainState, vae_report, evaluator_seconds: float) -> dict:
    """How the run's time went, for the training record: the VAE stage's training minutes and steps (they
    count against --minutes) and the minutes the evaluation classifier took to train (not counted)."""
    split = {}
    if vae_report is not None:
        split.update(vae_minutes=round(vae_report.seconds / 60, 2), vae_steps=vae_report.steps)
    if evaluator_seconds:
        split["evaluation_classifier_minutes"] = round(evaluator_seconds / 60, 2)
    return split


def time_split_line(split: dict, state: TrainState, minutes: float | None) -> str:
    """The summary's line on time: the VAE stage and the UNet, of --minutes; the evaluation apart."""
    parts = []
    if "vae_minutes" in split:
        parts.append(f"VAE stage {split['vae_minutes']:.2f} min ({split['vae_steps']} steps)")
    parts.append(f"{'UNet' if parts else 'model'} {state.seconds / 60:.2f} min ({state.step} steps)")
    line = "time: " + " + ".join(parts) + (f" of --minutes {minutes:g}" if minutes else "")
    if "evaluation_classifier_minutes" in split:
        line += f"; the evaluation classifier trained apart in {split['evaluation_classifier_minutes']:.2f} min"
    return line
