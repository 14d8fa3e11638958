"""Real multi-site operation: certificates and keys, SuperLink/SuperNode launch."""
