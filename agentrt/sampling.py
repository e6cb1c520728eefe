"""Moved to agentrt.engine.sampling and agentrt.engine.tokens (this alias goes once every import has moved)."""

from agentrt.engine.sampling import *  # noqa: F401,F403
from agentrt.engine.tokens import Detokenizer, StopChecker  # noqa: F401
