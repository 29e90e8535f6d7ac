"""PyTorch-native parallelism: the device mesh (``dims``), pipeline, context parallel,
activation checkpointing, compile and Float8."""
