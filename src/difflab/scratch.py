"""`difflab.scratch`: the from-scratch teaching implementation (course unit 1). The code lives in
`difflab/models/scratch.py`; read it there. `from difflab import scratch` gives the same names."""

from difflab.models.scratch import (
    BasicUNet,
    add_noise,
    alphas_cumprod,
    beta_schedule,
    corrupt,
    ddpm_sample,
    ddpm_step,
    sample,
    train,
)

__all__ = ["BasicUNet", "add_noise", "alphas_cumprod", "beta_schedule", "corrupt", "ddpm_sample", "ddpm_step",
           "sample", "train"]
