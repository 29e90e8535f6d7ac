"""Text data without Ray: sources, tokenizers, the deterministic sample stream and loaders."""
