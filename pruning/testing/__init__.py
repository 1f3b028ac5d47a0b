"""Test fixtures that are not on the runtime path: tiny offline checkpoints of the real
architectures (:func:`make_tiny_vlm`), built from scratch with no download, and a tiny Hulu-Med
in its GitHub code's layout (:func:`write_github_checkpoint`) for the converter."""

from pruning.testing.hulu_github import write_github_checkpoint
from pruning.testing.tiny import make_tiny_vlm, reference_inputs

__all__ = ["make_tiny_vlm", "reference_inputs", "write_github_checkpoint"]
