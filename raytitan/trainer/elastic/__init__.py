"""What lets a run change size: ranks that idle, growing at a checkpoint boundary, the restart
history, and injected faults for testing recovery."""
