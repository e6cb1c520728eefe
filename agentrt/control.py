"""Moved to agentrt.engine.control (this alias goes once every import has moved)."""

from agentrt.engine.control import *  # noqa: F401,F403
