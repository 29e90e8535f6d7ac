"""DCP checkpoints: ``layout`` (which steps exist and count; no training machinery),
``manager`` (saving and loading a run's state), ``convert`` (offline reads and conversions),
``torchtitan`` (torchtitan's step folders: recognized, read in place, converted both ways)."""
