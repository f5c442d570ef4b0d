"""Teachers: the model zoo (specs, identities, checkpoints, architectures) and the batched engine."""
