"""Everything between bytes and scores: storage, volumes, datasets, metrics, stages, the Ray Data
graph."""
