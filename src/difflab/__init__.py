"""difflab: train, sample, guide, condition, fine-tune, measure and share image diffusion models."""

__version__ = "0.1.0"
