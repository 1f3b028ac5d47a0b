"""The pure operations of the method: arrays and tensors in, indices or tensors out.

No model, no Ray, no I/O: slice filters (IAF and its variants, uniform sampling), attention
importance, the DINS nucleus, contextual merging, the baselines' selection rules, patch-to-token
maps, accounting and CT windowing. The methods in :mod:`pruning.methods` compose them.
"""
