"""Synthetic data: phantom CT volumes and datasets in every format, and the phantom VQA
benchmark."""
