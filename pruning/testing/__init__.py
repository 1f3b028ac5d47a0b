"""Test fixtures that are not on the runtime path: tiny offline checkpoints of the real
architectures (:func:`make_tiny_vlm`), built from scratch with no download."""

from pruning.testing.tiny import make_tiny_vlm, reference_inputs

__all__ = ["make_tiny_vlm", "reference_inputs"]
