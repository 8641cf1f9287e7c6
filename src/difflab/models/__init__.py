"""Model presets, the denoiser with its conditioning doors, the noise schedule, LoRA adapters and the
model container (`difflab.models.model`)."""
