"""The SDK: `Agent(model, tools, mode, output_type)` with `run`, `run_sync` and `stream`.

`chat` mode is the function-calling loop users know from the OpenAI Agents SDK / pydantic-ai
(calls of one turn run concurrently); `plan`, `dta` and `react` hand the question to the planner
(LLMCompiler, Divide-Then-Aggregate, ReAct); `thread` writes one reasoning tree with tools run inside the
generation and finished subtasks pruned from the KV cache (TIM/TIMRUN); `hogwild` runs parallel workers
over one cache. `output_type` makes the final answer a value decoded under its JSON schema.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import replace
from typing import Any, Generic, TypeVar

import anyio
from pydantic import TypeAdapter, ValidationError

from agentrt import planner
from agentrt.backends import Backend, LocalBackend, RemoteBackend, collect_notes, open_backend
from agentrt.chat import ChatOptions, ChatResult
from agentrt.choice import check_forced_call, normalize_tool_choice
from agentrt.engine.hogwild import HogwildPool
from agentrt.engine.sampling import SamplingParams
from agentrt.errors import BackendCapabilityError, InvalidRequestError, RunTimeoutError
from agentrt.events import AgentEvent, Final, PlanDelta, RunResult, TaskPlanned, TextDelta, ToolEnd, ToolStart
from agentrt.planner import Approver, ask_approval, refusal
from agentrt.threads import ThreadOptions, run_thread
from agentrt.tools import ToolRegistry

__all__ = ["Agent", "RunResult", "TextDelta", "PlanDelta", "TaskPlanned", "ToolStart", "ToolEnd", "Final",
           "AgentEvent"]

log = logging.getLogger(__name__)

T = TypeVar("T")
MODES = ("chat", "plan", "dta", "react", "thread", "hogwild")


class Agent(Generic[T]):
    """An agent over a model and tools. `model`: a name (default: the embedded smollm2-135m), a local
    directory or hub id, `openai:<base_url>#<model>`, an Engine or a Backend. `thread_options`: a
    `agentrt.threads.ThreadOptions` (or a dict of its fields) for thread mode.

    `approve(tool, args, call) -> bool` (sync or async) is asked before a tool with
    `side_effects=True` runs (`call`: the chat ToolCall, or the plan's Task in plan, dta, react and
    thread modes); without it such tools are refused, and the refusal is the result the model sees.

    `plan_options`: keyword arguments for the planner of plan, dta and react modes (`max_replans`,
    `examples`, `limits`, ...: see `agentrt.planner.run_plan`).

    `tool_choice`: "auto", "required" (the first turn must call a tool), or one tool, named as a string or
    as OpenAI's `{"type": "function", "function": {"name": ...}}` (the first turn calls that tool). A first
    turn that comes back without the call it was asked for is an error, never a plain answer.

    `logprobs`, `top_logprobs` (0-20), `frequency_penalty`, `presence_penalty` and `repetition_penalty`
    shape chat mode's turns (as the OpenAI parameters do; the other modes decode under their own grammars
    and refuse them; a remote server whose dialect has no field for one refuses it); `RunResult.stats["logprobs"]`
    then holds, per model turn, each token's {"token", "logprob", "top_logprobs"} (on the local engine
    logprob None where the grammar forced the token; from a remote server, what it streamed).

    An Agent is a context manager (`with` or `async with`): it closes its backend on exit."""

    def __init__(self, model: Any = None, tools: Iterable[Any] = (), *, mode: str = "chat",
                 output_type: type[T] = str, instructions: str | None = None, max_steps: int = 8,
                 timeout: float | None = None, temperature: float = 0.0, max_tokens: int = 512,
                 tool_top_k: int | None = None, tool_choice: str | dict = "auto", grammar_options: dict | None = None,
                 workers: int = 4, thread_options: Any = None, plan_options: dict | None = None,
                 approve: Approver | None = None, device: str | None = None, dtype: str | None = None,
                 logprobs: bool = False, top_logprobs: int = 0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, repetition_penalty: float = 1.0) -> None:
        if mode not in MODES:
            raise InvalidRequestError(f"mode {mode!r} is not one of {', '.join(MODES)}", param="mode")
        if isinstance(thread_options, dict):
            try:
                thread_options = ThreadOptions(**thread_options)
            except TypeError as exc:
                raise InvalidRequestError(f"thread_options: {exc}", param="thread_options") from None
        self.thread_options = thread_options or ThreadOptions()
        if not isinstance(workers, int) or workers < 1:
            raise InvalidRequestError(f"workers must be a positive integer, got {workers!r}", param="workers")
        self.workers = workers
        self.mode = mode
        self.registry = tools if isinstance(tools, ToolRegistry) else ToolRegistry(tools)
        self.output_type = output_type
        self.instructions = instructions
        self.max_steps = max_steps
        self.timeout = timeout
        self.tool_top_k = tool_top_k
        self.tool_choice = normalize_tool_choice(tool_choice, self.registry)
        self.grammar_options = dict(grammar_options or {})  # JsonSchema caps: max_string_length, ...
        self.plan_options = dict(plan_options or {})
        self.approve = approve
        self.params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
        chat_only = {"logprobs": logprobs, "top_logprobs": top_logprobs, "frequency_penalty": frequency_penalty,
                     "presence_penalty": presence_penalty, "repetition_penalty": repetition_penalty}
        self.chat_params = replace(self.params, **chat_only)  # checked here: a bad value is an error now
        if mode != "chat" and self.chat_params != self.params:
            name = next(k for k, v in chat_only.items() if getattr(self.params, k) != v)
            raise InvalidRequestError(f"{name} shapes chat mode's turns; mode {mode!r} does not take it", param=name)
        self._model, self._device, self._dtype = model, device, dtype
        self._backend: Backend | None = None
        self._closed = False

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = open_backend(self._model, device=self._device, dtype=self._dtype)
        return self._backend

    # --- entry points ---------------------------------------------------------------------------
    async def run(self, prompt: str, *, history: list[dict] | None = None) -> RunResult[T]:
        result = None
        async for ev in self.stream(prompt, history=history):
            if isinstance(ev, Final):
                result = ev.result
        assert result is not None
        return result

    def run_sync(self, prompt: str) -> RunResult[T]:
        async def run_then_release() -> RunResult[T]:
            try:
                return await self.run(prompt)
            finally:  # this event loop ends here: nothing of the backend may stay tied to it
                release = getattr(self._backend, "release", None)
                if release is not None:
                    await release()

        return anyio.run(run_then_release)

    async def stream(self, prompt: str, *, history: list[dict] | None = None) -> AsyncIterator[AgentEvent]:
        """Typed events as the run goes: text deltas, tool starts and ends, then Final.

        `history`: earlier messages of a conversation (chat mode only), placed between the
        instructions and `prompt`; `Final.result.messages` less the instructions continues it."""
        if history and self.mode != "chat":
            raise InvalidRequestError("history is taken by chat mode only", param="history")
        send, receive = anyio.create_memory_object_stream[AgentEvent](256)

        async def produce() -> None:
            async with send:
                try:
                    with anyio.fail_after(self.timeout):
                        await self._run(prompt, send.send, history or [])
                except TimeoutError as exc:
                    raise RunTimeoutError(f"the run took longer than timeout={self.timeout}s") from exc

        try:
            async with anyio.create_task_group() as tg, receive:
                tg.start_soon(produce)
                async for ev in receive:
                    yield ev
        except BaseExceptionGroup as group:  # one producer: surface its error as itself
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def aclose(self) -> None:
        """Close the backend (a local engine this Agent loaded, a remote server's connections); once.
        MCP servers its tools started are stopped too (a later run starts them again)."""
        await self.registry.aclose()
        if self._backend is not None and not self._closed:
            self._closed = True
            await self._backend.aclose()

    def close(self) -> None:
        """`aclose` from synchronous code (also after `run_sync`); inside an event loop await `aclose`."""
        self.registry.close()
        if self._backend is None or self._closed:
            return
        anyio.run(self.aclose)

    def __enter__(self) -> Agent[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Agent[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- modes ----------------------------------------------------------------------------------
    async def _run(self, prompt: str, emit: Callable, history: list[dict]) -> None:
        await self.registry.start()  # MCP servers start on first use, off the event loop
        with collect_notes() as notes:  # what the backend could not enforce itself, said by it
            if self.mode == "thread":
                return await self._thread(prompt, emit, notes)
            stats: dict[str, Any] = {}
            if self.mode == "chat":
                text, calls, messages, steps = await self._chat(prompt, emit, history, stats)
            elif self.mode == "hogwild":
                text, calls, messages, steps = await self._hogwild(prompt, emit, stats)
            else:
                text, calls, messages, steps = await self._planned(prompt, emit)
            output = await self._structure(prompt, text) if self.output_type is not str else text
            await emit(Final(RunResult(output, text, self.mode, calls, messages, steps, notes=list(notes),
                                       stats=stats)))

    async def _chat(self, prompt: str, emit: Callable, history: list[dict], stats: dict
                    ) -> tuple[str, list[ToolEnd], list[dict], int]:
        messages: list[dict] = ([{"role": "system", "content": self.instructions}] if self.instructions else [])
        messages.extend(history)
        messages.append({"role": "user", "content": prompt})
        done: list[ToolEnd] = []
        tools = self._offered(prompt)
        backend, turns, recorder = self.backend, None, None
        if self.chat_params.logprobs and isinstance(backend, LocalBackend):  # each turn's tokens, as they go
            recorder = _TokenLog(backend.engine)
            backend, turns = LocalBackend(recorder, compiler=backend.compiler), []
            stats["logprobs"] = turns
        elif self.chat_params.logprobs and isinstance(backend, RemoteBackend):  # the server's, on each result
            turns = stats["logprobs"] = []
        answer_now = False  # set once the model only repeats calls already made: it answers in text
        for step in range(1, self.max_steps + 1):
            final_turn = step == self.max_steps or answer_now
            choice = self.tool_choice if step == 1 else "auto"
            options = ChatOptions(tools=[] if final_turn else tools, tool_choice=choice,
                                  schema_options=self.grammar_options)
            result: ChatResult | None = None
            async for ev in backend.chat(messages, options, self.chat_params):
                if isinstance(ev, ChatResult):
                    result = ev
                elif ev.kind == "content":
                    await emit(TextDelta(ev.text))
            assert result is not None
            if turns is not None:
                turns.append(recorder.take() if recorder is not None else result.logprobs or [])
            calls = [c for c in result.tool_calls if c.complete]  # one cut by max_tokens never runs
            if not calls and result.refused and not result.content.strip() and not final_turn:
                answer_now = True  # it repeated a call whose result it has: the next turn answers
                continue
            if choice != "auto" and not final_turn:
                check_forced_call(choice, calls, result, self.backend.name, self.params.max_tokens)
            if not calls:
                messages.append({"role": "assistant", "content": result.content})
                return result.content, done, messages, step
            messages.append({"role": "assistant", "content": result.content or None, "tool_calls": [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in calls]})
            ends = await self._call_tools(calls, emit)
            done.extend(ends)
            messages.extend({"role": "tool", "tool_call_id": e.call_id, "content": e.observation} for e in ends)
        raise AssertionError("unreachable: the last turn offers no tools")

    def _selected(self, prompt: str):
        """The registry, trimmed to the `tool_top_k` tools relevant to `prompt` (Tool RAG) when asked."""
        reg = self.registry
        if self.tool_top_k is not None and len(reg) > self.tool_top_k:
            reg = reg.select(prompt, k=self.tool_top_k) or reg
        return reg

    def _offered(self, prompt: str) -> list[dict]:
        specs = self._selected(prompt).specs()
        if isinstance(self.tool_choice, dict):  # the named tool is offered whatever tool_top_k kept
            name = self.tool_choice["function"]["name"]
            if all(s["name"] != name for s in specs):
                specs.append(self.registry[name].spec())
        return [{"type": "function", "function": spec} for spec in specs]

    async def _call_tools(self, calls, emit: Callable) -> list[ToolEnd]:
        ends: list[ToolEnd | None] = [None] * len(calls)

        async def one(i: int, call) -> None:
            tool = self.registry.get(call.name)
            try:
                args = json.loads(call.arguments or "{}")
            except json.JSONDecodeError:
                args = None
            await emit(ToolStart(call.id, call.name, args if isinstance(args, dict) else {}))
            if tool is None:
                ends[i] = ToolEnd(call.id, call.name, False, f"Error: there is no tool named {call.name!r}")
            elif not isinstance(args, dict):
                ends[i] = ToolEnd(call.id, call.name, False, "Error: the arguments are not a JSON object")
            else:
                r = await self._invoke(tool, args, call)
                ends[i] = ToolEnd(call.id, call.name, r.ok, r.observation(), r.value)
            await emit(ends[i])

        async with anyio.create_task_group() as tg:  # calls of one turn are independent: run them together
            for i, call in enumerate(calls):
                tg.start_soon(one, i, call)
        return [e for e in ends if e is not None]

    async def _invoke(self, tool, args: dict, call):
        """Run a tool; one with side effects only when `approve` allows it, else its refusal is the result."""
        if tool.side_effects and not await ask_approval(self.approve, tool, args, call):
            return refusal(tool)
        return await tool.invoke(args)

    async def _planned(self, prompt: str, emit: Callable) -> tuple[str, list[ToolEnd], list[dict], int]:
        """Plan, dta and react: the planner runs the question; its plan text, tasks and tool runs stream
        out as events while it goes."""
        params, state = self.params, planner.ExecutionState()
        send, receive = anyio.create_memory_object_stream[AgentEvent](math.inf)
        model_calls, ends = itertools.count(), {}

        async def llm_text(text: str, grammar: str | None) -> AsyncIterator[str]:
            call = next(model_calls)
            async for chunk in self.backend.text(text, grammar, params):
                send.send_nowait(PlanDelta(chunk, call))
                yield chunk

        def on_span(kind: str, span) -> None:  # the executor's trace, on this event loop
            tid, task = str(span.task_id), state.tasks[span.task_id]
            if kind == "task":
                ev = TaskPlanned(tid, span.tool, task.to_json()["args"], [str(d) for d in sorted(task.deps)])
            elif kind == "start":
                args = state.resolved_args.get(span.task_id)
                ev = ToolStart(tid, span.tool, args if isinstance(args, dict) else {})
            else:
                r = state.results[span.task_id]
                ev = ends[span.task_id] = ToolEnd(tid, span.tool, r.ok, r.observation(), r.value,
                                                  round(span.duration, 4))
            send.send_nowait(ev)

        async def forward() -> None:
            async with receive:
                async for ev in receive:
                    await emit(ev)

        question = f"{self.instructions}\n\n{prompt}" if self.instructions else prompt
        runner = {"plan": planner.run_plan, "dta": planner.run_dta, "react": planner.run_react}[self.mode]
        kwargs: dict[str, Any] = {"max_steps": self.max_steps} if self.mode == "react" else {}
        kwargs.update(self.plan_options)
        if self.approve is not None:  # the default executor refuses side effects
            kwargs["executor"] = planner.Executor(self.registry, approve=self.approve)
        state.trace.listeners.append(on_span)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(forward)
                with send:
                    run = await runner(question, llm_text, self.registry, tool_top_k=self.tool_top_k, state=state,
                                       **kwargs)
        except BaseExceptionGroup as group:  # the planner's own error, as itself
            raise group.exceptions[0] if len(group.exceptions) == 1 else group from None
        answer = run.answer or ""
        await emit(TextDelta(answer))
        calls = [ends[tid] for tid in sorted(ends)]
        return answer, calls, [{"role": "assistant", "content": o} for o in run.outputs], run.rounds

    async def _hogwild(self, prompt: str, emit: Callable, stats: dict
                       ) -> tuple[str, list[ToolEnd], list[dict], int]:
        """Hogwild! Inference: `workers` decoders over one shared KV cache (local engine only)."""
        engine = getattr(self.backend, "engine", None)
        if engine is None:
            raise InvalidRequestError("mode 'hogwild' needs the local engine (its shared KV cache); a remote "
                                      "backend cannot run it", param="mode")
        question = f"{self.instructions}\n\n{prompt}" if self.instructions else prompt
        result = await HogwildPool(engine, workers=self.workers).run(question, max_tokens=self.params.max_tokens,
                                                                      params=self.params)
        answer = result.answer or ""
        stats.update(workers=result.texts, steps=result.steps, generated_tokens=result.generated_tokens,
                     finish_reason=result.finish_reason)
        await emit(TextDelta(answer))
        return answer, [], [{"role": "assistant", "content": t} for t in result.texts], result.steps

    async def _thread(self, prompt: str, emit: Callable, notes: list[str]) -> None:
        """TIM-style thread: one tree, tools inside the generation, KV pruning (local engine; a remote
        backend runs tools between requests without pruning and says so in `notes`)."""
        options = self.thread_options
        if isinstance(self.tool_choice, dict):
            raise InvalidRequestError("thread mode takes tool_choice 'auto' or 'required', not a named tool",
                                      param="tool_choice")
        if self.tool_choice == "required":
            options = replace(options, require_tool=True)
        started = 0

        async def on_event(ev) -> None:
            nonlocal started
            if ev.kind == "tool_call":
                started += 1
                args = ev.data["arguments"] if isinstance(ev.data["arguments"], dict) else {}
                await emit(ToolStart(f"call_{started}", ev.data["tool_name"], args))
            elif ev.kind == "tool_end":
                await emit(_tool_end(started, ev.data))

        typed = self.output_type is not str
        tools = self._selected(prompt)
        executor = None
        if self.approve is not None:  # the default executor refuses side effects
            executor = planner.Executor(tools, approve=self.approve, default_timeout=options.tool_timeout)
        result = await run_thread(self.backend, prompt, tools, options=options, executor=executor,
                                  answer_schema=self.output_type if typed else None, params=self.params,
                                  instructions=self.instructions, on_event=on_event, **self.grammar_options)
        result.raise_for_incomplete()
        answer = result.answer
        text = answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)
        await emit(TextDelta(text))
        output = TypeAdapter(self.output_type).validate_python(answer) if typed else text
        calls = [_tool_end(i, c) for i, c in enumerate(result.tool_calls, 1)]
        messages = [{"role": "assistant", "content": result.text}]
        await emit(Final(RunResult(output, text, self.mode, calls, messages, len(calls) + 1, result.tree,
                                   [*result.notes, *(n for n in notes if n not in result.notes)])))

    async def _structure(self, prompt: str, answer: str) -> T:
        """Decode the final value under output_type's JSON schema; a value that does not validate (a
        backend that could not enforce the schema, or a check the grammar leaves out) is asked for once
        more with the validation error fed back, then refused with BackendCapabilityError."""
        adapter = TypeAdapter(self.output_type)
        schema = adapter.json_schema()
        messages = [{"role": "user", "content": prompt}]
        if answer:
            messages += [{"role": "assistant", "content": answer},
                         {"role": "user", "content": "Now give that answer as JSON."}]
        options = ChatOptions(response_format={"type": "json_schema",
                                               "json_schema": {"name": "output", "schema": schema}},
                              schema_options=self.grammar_options)
        for attempt in (1, 2):
            result = None
            async for ev in self.backend.chat(messages, options, self.params):
                if isinstance(ev, ChatResult):
                    result = ev
            assert result is not None
            if result.finish_reason == "length":
                raise InvalidRequestError(f"the structured answer was cut at max_tokens={self.params.max_tokens}: "
                                          "raise max_tokens", param="max_tokens")
            try:
                return adapter.validate_json(result.content)
            except ValidationError as exc:
                error = _short_validation_error(exc)
            if attempt == 2:
                raise BackendCapabilityError(
                    f"{self.backend.name}: the structured answer did not validate against output_type's "
                    f"schema, also after a retry with the error fed back: {error}; output: "
                    f"{result.content[:200]!r}", feature="response_format")
            log.warning("structured answer did not validate (%s): asking once more", error)
            messages = [*messages, {"role": "assistant", "content": result.content},
                        {"role": "user", "content": f"That JSON is not valid: {error}. Answer again with JSON "
                                                    f"that matches this schema: {json.dumps(schema)}"}]
        raise AssertionError("unreachable")


class _TokenLog:
    """The engine as a chat turn sees it, keeping each token's logprobs on the way (Agent(logprobs=True))."""

    def __init__(self, engine) -> None:
        self._engine, self._outputs = engine, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator:
        async for out in self._engine.stream(*args, **kwargs):
            self._outputs.append(out)
            yield out

    def take(self) -> list[dict]:
        """The tokens streamed since the last take, as OpenAI's chat logprobs content."""
        decode, entries = self._engine.tokenizer.decode, []
        for out in self._outputs:
            n = len(out.token_ids)
            for t, lp, top in zip(out.token_ids, out.logprobs or [None] * n, out.top_logprobs or [None] * n):
                entries.append({"token": decode([t]), "logprob": lp, "top_logprobs": [
                    {"token": decode([a]), "logprob": alp} for a, alp in (top or {}).items()]})
        self._outputs = []
        return entries


def _short_validation_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(f"{'.'.join(map(str, e.get('loc', ()))) or '<root>'}: {e.get('msg')}" for e in errors()[:5])
    return str(exc)[:300]


def _tool_end(index: int, call) -> ToolEnd:
    """A thread-mode tool call (agentrt.threads.ThreadToolCall) as the SDK's ToolEnd event."""
    r = call.result
    return ToolEnd(f"call_{index}", call.tool_name, r.ok, r.observation(), r.value)
