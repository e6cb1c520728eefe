"""agentrt.threads."""
