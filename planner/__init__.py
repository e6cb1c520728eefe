"""agentrt.planner."""
