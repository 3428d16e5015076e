"""Training on Ray Train: data, trainer steps, checkpoints, parallelism, EMA."""
