"""Examples. A package so that ``examples.custom_model:spec`` imports from the repository root."""
