"""DCP checkpoints: ``layout`` (which steps exist and count; no training machinery),
``manager`` (saving and loading a run's state), ``convert`` (offline reads and conversions)."""
