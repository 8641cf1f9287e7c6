"""The one training loop and its parts: losses, checkpoints, the run folder."""
