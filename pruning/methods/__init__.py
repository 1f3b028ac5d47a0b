"""Pruning methods: one module per method, each with its typed parameters, its slice-level
rule (run once, on the CPU, before the vision encoder) and its token-level rule."""
