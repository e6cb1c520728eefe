"""Moved to agentrt.engine.constraint (this alias goes once every import has moved)."""

from agentrt.engine.constraint import *  # noqa: F401,F403
