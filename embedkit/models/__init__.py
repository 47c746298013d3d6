"""Model zoo: a registry of names to specs, one module per model family."""
