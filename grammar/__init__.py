"""agentrt.grammar."""
