"""Metrics: the paper's reference scorer and the standard one, offline WordNet, and run
summaries."""
