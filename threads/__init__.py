"""agentrt.threads: thread mode (TIM/TIMRUN, "Subconscious Threads"): the model writes a reasoning tree
(thought, tooluse, subtasks, conclusion) under a grammar; tools run inside the generation; closed subtask
lists leave the KV cache with positions reused, so working memory stays bounded."""

from __future__ import annotations

from agentrt.threads._pruning import PruneBuffer, ThreadStats, TokenBytes
from agentrt.threads._runner import ThreadOptions, ThreadResult, ThreadToolCall, run_thread, thread_messages
from agentrt.threads._schema import TREE_SEPARATORS, ThreadSchema
from agentrt.threads._shape import ShapeTask, TreeShape
from agentrt.threads._tracker import EVENT_KINDS, StructureTracker, TreeEvent

__all__ = [
    "ThreadSchema",
    "TREE_SEPARATORS",
    "TreeShape",
    "ShapeTask",
    "StructureTracker",
    "TreeEvent",
    "EVENT_KINDS",
    "PruneBuffer",
    "TokenBytes",
    "ThreadStats",
    "ThreadOptions",
    "ThreadResult",
    "ThreadToolCall",
    "run_thread",
    "thread_messages",
]
