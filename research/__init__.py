"""Experiments kept beside the product, not packaged: nothing in pruning/, pipeline/, serve/ or
jobs/ imports this package (run its modules from the repository root, ``python -m research.X``).
"""
