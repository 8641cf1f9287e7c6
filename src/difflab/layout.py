"""The names of what difflab keeps on disk, in one place."""

from __future__ import annotations

INFO_FILE = "difflab.json"  # what a model is and was made from, beside its weights
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LORA_PICKLE = "pytorch_lora_weights.bin"  # diffusers' LORA_WEIGHT_NAME (older runs)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")  # weights that unpickling would read
