"""Model folders in the diffusers format, and their model cards."""
