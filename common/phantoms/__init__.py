"""Generators of synthetic data in the real on-disk formats, with a ground truth a working model can learn."""
