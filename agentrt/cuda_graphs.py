"""Moved to agentrt.engine.cuda_graphs (this alias goes once every import has moved)."""

from agentrt.engine.cuda_graphs import *  # noqa: F401,F403
