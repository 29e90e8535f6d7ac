"""Training parts with no knowledge of the loop or the launcher: checkpoints, data, storage,
optimizer, loss, metrics, profiling."""
