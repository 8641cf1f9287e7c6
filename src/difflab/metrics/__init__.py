"""Measuring models: Fréchet distance in a feature space, class accuracy of generated images."""
