"""Measuring models: Fréchet distance in a feature space, class accuracy of generated images, and
prompt adherence on `shapes` (attributes.py)."""
