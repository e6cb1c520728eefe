"""`agentrt chat`: a terminal agent — prompt_toolkit reads, rich draws (streamed text, then Markdown).

`ChatApp` is the whole loop (messages, slash commands, approvals, Ctrl-C) over an agent factory, a
rich Console and an input source, so it runs headless in tests; `run_chat` puts a real terminal
around it. Every mode runs through `Agent.stream`: plan, dta and react runs draw the plan being decoded
and its tasks live from the agent's events (agentrt.views); chat, thread and hogwild runs show their
tool calls as they happen and the answer at the end.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio
import pydantic
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markdown import Markdown
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from agentrt.agent import MODES, Agent
from agentrt.backends import open_backend
from agentrt.errors import AgentrtError, InvalidRequestError
from agentrt.events import Final, PlanDelta, TaskPlanned, TextDelta, ToolEnd, ToolStart
from agentrt.engine.models import agentrt_home
from agentrt.planner import Trace
from agentrt.tools import Tool, ToolResult, calculator, workspace_tools
from agentrt.views import PlanBoard, clip, plan_view

__all__ = ["AgentFactory", "ApprovalGate", "ChatApp", "InputSource", "PromptInput", "Turn", "chat_tools",
           "local_agents", "run_chat"]

CHAT_MODES = MODES  # every mode the SDK has
COMMANDS = {
    "/help": "this list",
    "/tools": "the tools the agent can call",
    "/mode [name]": "show or switch the mode: " + ", ".join(CHAT_MODES),
    "/model [name]": "show or switch the model",
    "/trace [path]": "write the last run's Chrome trace JSON (open it in Perfetto)",
    "/clear": "forget the conversation",
    "/exit": "leave (Ctrl-D does too)",
}
INSTRUCTIONS = ("You are a helpful assistant in a terminal. Call a tool when it helps: calculator for "
                "arithmetic, read_file, list_dir and write_file for files in the workspace (relative paths).")

AgentFactory = Callable[[str, str, list[Tool]], Agent]  # (model, mode, tools) -> Agent


class InputSource(Protocol):
    async def read(self, message: str, *, toolbar: str | None = None) -> str:
        """The next message; raises EOFError on Ctrl-D and KeyboardInterrupt on Ctrl-C."""
        ...

    async def ask(self, message: str) -> str:
        """A one-line answer (approvals), kept out of the message history."""
        ...


class PromptInput:
    """prompt_toolkit input: Enter sends, Esc+Enter (Meta+Enter) starts a new line, history in a file
    or in memory. `input`/`output` default to the terminal (tests pass a pipe and DummyOutput)."""

    def __init__(self, *, history_file: Path | None = None, input: Any = None, output: Any = None) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        keys = KeyBindings()

        @keys.add("enter")
        def _send(event) -> None:
            event.current_buffer.validate_and_handle()

        @keys.add("escape", "enter")
        def _newline(event) -> None:
            event.current_buffer.insert_text("\n")

        history = FileHistory(str(history_file)) if history_file is not None else InMemoryHistory()
        self.session = PromptSession(history=history, multiline=True, key_bindings=keys, prompt_continuation="… ",
                                     input=input, output=output)
        self.answers = PromptSession(input=input, output=output)

    async def read(self, message: str, *, toolbar: str | None = None) -> str:
        return await self.session.prompt_async(message, bottom_toolbar=toolbar)

    async def ask(self, message: str) -> str:
        return await self.answers.prompt_async(message)


class ApprovalGate(Tool):
    """A side-effecting tool that asks before every call, then runs as the tool it wraps (chat mode
    calls tools directly; plan modes ask through the Executor's `approve` instead)."""

    def __init__(self, inner: Tool, approve: Callable[[Tool, dict], Awaitable[bool]]) -> None:
        super().__init__(inner.fn, name=inner.name, description=inner.description, timeout=inner.timeout,
                         max_concurrency=inner.max_concurrency, retries=inner.retries, side_effects=False)
        self.inner = inner
        self._approve = approve

    async def invoke(self, args: Mapping[str, Any], **kwargs: Any) -> ToolResult:
        try:
            self.validate(args)
        except pydantic.ValidationError:  # bad arguments never reach the user: the model hears why
            return await super().invoke(args, **kwargs)
        if not await self._approve(self.inner, dict(args)):
            return ToolResult("refused", error=f"the user did not allow {self.name} to run")
        return await super().invoke(args, **kwargs)


def chat_tools(workspace: str | Path = ".") -> list[Tool]:
    """The built-in chat tools: calculator, and read_file/list_dir/write_file confined to `workspace`."""
    return [calculator, *workspace_tools(workspace)]


def local_agents(*, device: str | None = None, dtype: str | None = None, max_tokens: int = 512) -> AgentFactory:
    """Agents over one model at a time: a new mode reuses the loaded backend, a new model loads its own
    (ChatApp closes the old agent, and with it the backend it owned)."""
    loaded: dict[str, Any] = {}

    def make(model: str, mode: str, tools: list[Tool]) -> Agent:
        if model not in loaded:
            loaded.clear()
            loaded[model] = open_backend(model, device=device, dtype=dtype)
        # write_file takes whole files: no string cap (a call near max_tokens is still steered to close)
        return Agent(loaded[model], tools, mode=mode, max_tokens=max_tokens,
                     instructions=INSTRUCTIONS if mode == "chat" else None,
                     grammar_options={"max_string_length": None})

    return make


@dataclass
class Turn:
    """What one message produced, as the user saw it."""

    prompt: str
    text: str = ""
    deltas: int = 0  # text pieces drawn before the end
    tools: list[ToolEnd] = field(default_factory=list)
    seconds: float = 0.0
    cancelled: bool = False
    error: str | None = None


class _TurnView:
    """The transient part of a turn: the streamed text, or the plan and its tasks, with a spinner."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.started = time.perf_counter()
        self.text = ""
        self.board: PlanBoard | None = None  # plan modes: the plan and its tasks
        self.live = self._live()
        self._paused = False

    def _live(self) -> Live:
        return Live(console=self.console, refresh_per_second=8, transient=True)

    def render(self) -> RenderableType:
        took = f"{time.perf_counter() - self.started:.1f}s · Ctrl-C cancels"
        if self.board is not None:
            return Group(plan_view(self.board), Spinner("dots", text=took))
        return Group(Text(self.text), Spinner("dots", text=Text(took, style="dim")))

    async def animate(self) -> None:
        while True:
            if not self._paused:
                self.live.update(self.render())
            await anyio.sleep(1 / 8)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Take the live region off the screen (to ask the user something), then put it back."""
        self._paused = True
        self.live.stop()
        try:
            yield
        finally:
            self.live = self._live()  # a stopped Live would redraw over the lines printed meanwhile
            self.live.start()
            self._paused = False


class ChatApp:
    """The chat loop over `agent_factory(model, mode, tools)`, drawing on `console`, reading `input`.

    `await handle(line)` runs one message or slash command (returns the Turn of a message);
    `await run()` reads lines until /exit or Ctrl-D; `cancel()` stops the run in progress (Ctrl-C).
    """

    def __init__(self, agent_factory: AgentFactory, console: Console, input: InputSource, *, model: str,
                 mode: str = "chat", tools: list[Tool] | None = None) -> None:
        if mode not in CHAT_MODES:
            raise InvalidRequestError(f"mode {mode!r} is not one of {', '.join(CHAT_MODES)}", param="mode")
        self.factory, self.console, self.input = agent_factory, console, input
        self.model, self.mode = model, mode
        tools = chat_tools() if tools is None else tools
        self.tools = [ApprovalGate(t, self._approve) if t.side_effects else t for t in tools]
        self.history: list[dict] = []
        self.always: set[str] = set()  # tools the user allowed for the whole session
        self.trace: Trace | None = None  # of the last run
        self.done = False
        self._scope: anyio.CancelScope | None = None
        self._view: _TurnView | None = None
        self._asking = anyio.Lock()
        with console.status(f"loading {model}"):
            self.agent = agent_factory(model, mode, self.tools)

    # --- the loop -------------------------------------------------------------------------------
    async def run(self) -> None:
        self.console.print(f"[bold]agentrt chat[/] · [cyan]{self.model}[/] · mode [cyan]{self.mode}[/] — Enter "
                           "sends, Esc+Enter adds a line, /help lists commands, Ctrl-C cancels a run, Ctrl-D leaves")
        try:
            while not self.done:
                try:
                    line = await self.input.read(f"{self.mode}› ", toolbar=f" {self.model} · {self.mode} · /help")
                except KeyboardInterrupt:
                    continue
                except EOFError:
                    break
                await self.handle(line)
        finally:
            await self.agent.aclose()

    async def handle(self, line: str) -> Turn | None:
        line = line.strip()
        if not line:
            return None
        if line.startswith("/"):
            await self.command(line)
            return None
        return await self.send(line)

    def cancel(self) -> bool:
        """Cancel the run in progress (what Ctrl-C does); the conversation stays as it was before it."""
        if self._scope is None:
            return False
        self._scope.cancel()
        return True

    # --- a message ------------------------------------------------------------------------------
    async def send(self, prompt: str) -> Turn:
        turn = Turn(prompt)
        view = self._view = _TurnView(self.console)
        with anyio.CancelScope() as scope:
            self._scope = scope
            try:
                async with anyio.create_task_group() as tg:
                    await tg.start(self._interrupts, scope)
                    tg.start_soon(view.animate)
                    view.live.start()
                    try:
                        await self._runner()(turn, view)
                    finally:
                        view.live.stop()
                        tg.cancel_scope.cancel()
            except* AgentrtError as group:
                turn.error = "; ".join(str(e) for e in group.exceptions)
        self._scope = self._view = None
        turn.cancelled = scope.cancel_called
        turn.seconds = time.perf_counter() - view.started
        self._show(turn, view)
        return turn

    async def _interrupts(self, scope: anyio.CancelScope, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        """While a run goes, Ctrl-C (SIGINT) cancels it instead of ending the program."""
        try:
            with anyio.open_signal_receiver(signal.SIGINT) as signals:
                task_status.started()
                async for _ in signals:
                    scope.cancel()
        except (NotImplementedError, ValueError, RuntimeError):  # no signals here (not the main thread)
            task_status.started()
            await anyio.sleep_forever()

    def _runner(self) -> Callable[[Turn, _TurnView], Awaitable[None]]:
        return self._chat if self.mode == "chat" else self._streamed

    async def _chat(self, turn: Turn, view: _TurnView) -> None:
        result = await self._follow(turn, view, self.agent.stream(turn.prompt, history=self.history))
        self.history = result.messages[1:] if self.agent.instructions else result.messages

    async def _streamed(self, turn: Turn, view: _TurnView) -> None:
        """Every mode but chat takes one question: the conversation so far rides in front of it. Plan, dta
        and react runs draw their plan and its tasks live."""
        if self.mode in ("plan", "dta", "react"):
            view.board = PlanBoard()
        await self._follow(turn, view, self.agent.stream(_with_history(self.history, turn.prompt)))
        self.history += [{"role": "user", "content": turn.prompt}, {"role": "assistant", "content": turn.text}]

    async def _follow(self, turn: Turn, view: _TurnView, stream: AsyncIterator) -> Any:
        """Draw an agent's events as they come (text, tool starts and ends); the run's result."""
        trace = self.trace = Trace()
        ids: dict[str, int] = {}
        result = None
        async with contextlib.aclosing(stream) as events:
            async for ev in events:
                if view.board is not None:
                    view.board.add(ev)
                if isinstance(ev, (PlanDelta, TaskPlanned)):
                    continue
                if isinstance(ev, TextDelta):
                    view.text += ev.text
                    turn.deltas += 1
                elif isinstance(ev, ToolStart):
                    ids[ev.call_id] = tid = len(ids) + 1
                    span = trace.span(tid, ev.name)
                    span.start, span.args, span.status = trace.now(), ev.arguments, "running"
                    args = json.dumps(ev.arguments, ensure_ascii=False)
                    if view.board is None:  # a plan's calls are on its board
                        self.console.print(Text.assemble(("⚙ ", "cyan"), (ev.name, "bold cyan"), f"({clip(args)})"))
                elif isinstance(ev, ToolEnd):
                    if ev.call_id not in ids:  # a plan task that ended without running (a failed input)
                        ids[ev.call_id] = len(ids) + 1
                        trace.span(ids[ev.call_id], ev.name).start = trace.now()
                    span = trace.spans[ids[ev.call_id]]
                    span.end, span.status = trace.now(), "ok" if ev.ok else "error"
                    span.error = None if ev.ok else ev.observation
                    turn.tools.append(ev)
                    if view.board is None:
                        self.console.print(_tool_line(ev.name, ev.ok, span.duration, ev.observation))
                elif isinstance(ev, Final):
                    result = ev.result
        assert result is not None
        turn.text = result.text
        return result

    def _show(self, turn: Turn, view: _TurnView) -> None:
        """What stays on screen once the turn is over: the final DAG, the answer as Markdown, a footer."""
        con = self.console
        if view.board is not None:
            con.print(plan_view(view.board))
        if turn.cancelled:
            if view.text:
                con.print(Text(view.text, style="dim"))
            con.print("[yellow]cancelled[/] — the conversation is as it was before this message")
            return
        if turn.error is not None:
            con.print(f"[red]error:[/] {turn.error}" + (" (/clear starts afresh)" if self.history else ""))
            return
        con.print(Markdown(turn.text) if turn.text.strip() else Text("(no answer)", style="dim"))
        calls = f" · {len(turn.tools)} tool call{'s' if len(turn.tools) != 1 else ''}" if turn.tools else ""
        con.print(Text(f"{turn.seconds:.1f}s{calls}", style="dim"))

    # --- approvals ------------------------------------------------------------------------------
    async def _approve(self, tool: Tool, args: dict) -> bool:
        if tool.name in self.always:
            return True
        async with self._asking:  # calls of one turn run together: ask about one at a time
            if tool.name in self.always:
                return True
            paused = self._view.paused() if self._view is not None else contextlib.nullcontext()
            with paused:
                self.console.print(Text.assemble(("? ", "bold yellow"), (tool.name, "bold"),
                                                 f"({clip(json.dumps(args, ensure_ascii=False), 400)})",
                                                 " has side effects"))
                while True:
                    try:
                        answer = (await self.input.ask("allow? [y]es / [n]o / [a]lways: ")).strip().lower()
                    except KeyboardInterrupt:
                        self.cancel()
                        return False
                    except EOFError:
                        answer = "n"
                    if answer in ("y", "yes"):
                        return True
                    if answer in ("a", "always"):
                        self.always.add(tool.name)
                        return True
                    if answer in ("", "n", "no"):
                        return False
                    self.console.print("answer y, n or a")

    # --- slash commands -------------------------------------------------------------------------
    async def command(self, line: str) -> None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        con = self.console
        if name == "/help":
            table = Table.grid(padding=(0, 2))
            for cmd, what in COMMANDS.items():
                table.add_row(Text(cmd, style="cyan"), what)
            con.print(table)
            con.print("[dim]Enter sends · Esc+Enter adds a line · Ctrl-C cancels a run · Ctrl-D leaves[/]")
        elif name == "/tools":
            table = Table("tool", "approval", "what it does")
            for t in self.tools:
                asks = isinstance(t, ApprovalGate)
                table.add_row(t.name, ("always allowed" if t.name in self.always else "asks first") if asks else "-",
                              t.description)
            con.print(table)
        elif name == "/mode" and not arg:
            con.print(f"mode: [cyan]{self.mode}[/] (of {', '.join(CHAT_MODES)})")
        elif name == "/mode":
            await self._switch(mode=arg)
        elif name == "/model" and not arg:
            con.print(f"model: [cyan]{self.model}[/]")
        elif name == "/model":
            await self._switch(model=arg)
        elif name == "/trace":
            if self.trace is None:
                con.print("no run yet: send a message first")
            else:
                path = Path(arg or "agentrt-trace.json")
                self.trace.write_chrome(path)
                con.print(f"wrote {path} ({len(self.trace.spans)} tool spans) — open it in https://ui.perfetto.dev")
        elif name == "/clear":
            self.history.clear()
            con.print("conversation cleared")
        elif name == "/exit":
            self.done = True
        else:
            con.print(f"unknown command {name} — /help lists the commands")

    async def _switch(self, *, mode: str | None = None, model: str | None = None) -> None:
        if mode is not None and mode not in CHAT_MODES:
            self.console.print(f"[red]no mode {mode!r}[/]: choose one of {', '.join(CHAT_MODES)}")
            return
        mode, model = mode or self.mode, model or self.model
        try:
            with self.console.status(f"loading {model}"):
                agent = self.factory(model, mode, self.tools)
        except AgentrtError as exc:
            self.console.print(f"[red]error:[/] {exc}")
            return
        if model != self.model:
            await self.agent.aclose()
        self.agent, self.mode, self.model = agent, mode, model
        self.console.print(f"model [cyan]{model}[/] · mode [cyan]{mode}[/]")


def _tool_line(name: str, ok: bool, seconds: float, observation: str) -> Text:
    mark = ("  ✓ ", "green") if ok else ("  ✗ ", "red")
    return Text.assemble(mark, (name, "bold"), (f" {seconds:.2f}s  ", "dim"), (clip(observation, 160), "dim"))


def _with_history(history: list[dict], prompt: str, max_chars: int = 2000) -> str:
    """The planner takes one question: earlier turns go in front of it as context."""
    said = [f"{m['role']}: {m['content']}" for m in history
            if m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str) and m["content"]]
    if not said:
        return prompt
    return f"Conversation so far:\n{chr(10).join(said)[-max_chars:]}\n\nQuestion: {prompt}"


async def run_chat(*, model: str, mode: str = "chat", workspace: str | Path = ".", device: str | None = None,
                   dtype: str | None = None, max_tokens: int = 512, extra_tools: list[Tool] = ()) -> None:
    """`agentrt chat` in a real terminal; input history is kept in $AGENTRT_HOME/chat_history.
    `extra_tools` join the built-in ones (`agentrt chat --mcp`: an MCP server's tools)."""
    home = agentrt_home()
    home.mkdir(parents=True, exist_ok=True)
    app = ChatApp(local_agents(device=device, dtype=dtype, max_tokens=max_tokens), Console(),
                  PromptInput(history_file=home / "chat_history"), model=model, mode=mode,
                  tools=[*chat_tools(workspace), *extra_tools])
    app.console.print(f"[dim]workspace: {Path(workspace).resolve()}[/]")
    await app.run()
