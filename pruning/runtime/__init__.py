"""The model runtime: checkpoints, slice recipes, family adapters, attention capture, the
pruned language-model sequence and generation (:func:`pruning.runtime.vlm.load_vlm`).

Needs torch and transformers; nothing here decides which slices or tokens are kept: the
methods in :mod:`pruning.methods` do.
"""
