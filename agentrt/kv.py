"""Moved to agentrt.engine.kv (this alias goes once every import has moved)."""

from agentrt.engine.kv import *  # noqa: F401,F403
