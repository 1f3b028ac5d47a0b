"""Datasets: the canonical record, readers of the five manifest formats, and the paper's prompts."""
