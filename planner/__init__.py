"""agentrt.planner: LLMCompiler-style planning (Kim et al., 2024) — a plan language with a streaming
parser and per-request decoding grammars (XGrammar), a dependency-driven anyio executor, the joiner
with replanning, Divide-Then-Aggregate rounds (DTA-Llama) and a ReAct baseline."""

from __future__ import annotations

from agentrt.planner._executor import (Approver, ExecutionState, Executor, approve_in_terminal, ask_approval,
                                       refusal)
from agentrt.planner._grammar import GrammarLimits, joiner_grammar, plan_grammar, react_grammar
from agentrt.planner._joiner import JoinerDecision, parse_joiner
from agentrt.planner._modes import AgentRun, TextLLM, run_dta, run_plan, run_react
from agentrt.planner._parser import Plan, PlanParser, parse_plan, plan_lark, stream_tasks, validate_task
from agentrt.planner._task import ReferenceResolutionError, Ref, Task, Template, resolve
from agentrt.planner._trace import TaskSpan, Trace

__all__ = [
    "Ref",
    "Template",
    "Task",
    "resolve",
    "ReferenceResolutionError",
    "Plan",
    "PlanParser",
    "parse_plan",
    "stream_tasks",
    "plan_lark",
    "validate_task",
    "GrammarLimits",
    "plan_grammar",
    "react_grammar",
    "joiner_grammar",
    "JoinerDecision",
    "parse_joiner",
    "Executor",
    "ExecutionState",
    "Approver",
    "approve_in_terminal",
    "ask_approval",
    "refusal",
    "Trace",
    "TaskSpan",
    "TextLLM",
    "AgentRun",
    "run_plan",
    "run_dta",
    "run_react",
]
