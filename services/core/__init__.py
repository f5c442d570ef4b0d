"""What both sides share: the errors a user can fix, the one registry type, YAML config loading, the weights
reader and the service contract's constants."""
