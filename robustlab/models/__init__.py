"""Models: architectures by name, the Normalize wrapper, checkpoints with model cards."""
