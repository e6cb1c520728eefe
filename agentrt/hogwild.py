"""Moved to agentrt.engine.hogwild (this alias goes once every import has moved)."""

from agentrt.engine.hogwild import *  # noqa: F401,F403
