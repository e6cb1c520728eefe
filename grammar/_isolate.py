"""Compiles that can be stopped: worker processes build, check and compile constraints, and one is
killed when its deadline passes. xgrammar's compile cannot be interrupted, so a compile in a thread
of the server would keep burning CPU after its request was refused.

A worker sends back the grammar (small) and, when its compile took long enough to be worth it, the
compiled grammar serialised; otherwise the caller recompiles the grammar, known now to be quick.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import importlib.util
import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any

import xgrammar as xgr

from agentrt.errors import GrammarError, OverloadedError
from agentrt.grammar._bounds import GrammarLimits, check_grammar

__all__ = ["COMPILE_CLIENT", "Compiled", "CompileRateLimitError", "RestartBudget", "WorkerPool", "compile_checked",
           "compile_client", "constraint_param", "describe", "mark_recoverable", "recoverable"]

log = logging.getLogger(__name__)

# A compile shorter than this is redone by the caller: serialising a compiled grammar can take
# several times as long as compiling it (185 MB of JSON for 1,000 integer properties).
RECOMPILE_BELOW = 1.0


@dataclass
class Compiled:
    """What a worker sends back: the grammar, its warnings, the compile time, and the compiled
    grammar serialised (None: compile it again, it is quick)."""

    grammar_json: str
    warnings: list[str]
    seconds: float
    compiled_json: str | None


class _Worker:
    """One worker process (`_main` in a fresh interpreter), spoken to in length-prefixed pickles
    over its stdin and stdout: a fresh interpreter that never re-imports the caller's main module."""

    def __init__(self, info_json: str, threads: int, limits: GrammarLimits) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _MAIN, *_package_paths()], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, start_new_session=True)
        # the tokenizer (MBs) goes through the pipe as the worker starts reading: not on the caller's time
        self._init = threading.Thread(target=self._send_init, args=(pickle.dumps((info_json, threads, limits)),),
                                      daemon=True)
        self._init.start()
        self._ready = False

    def _send_init(self, blob: bytes) -> None:
        try:
            _send(self.proc.stdin, blob)
        except (BrokenPipeError, ValueError, OSError):  # killed while starting
            pass

    def wait_ready(self) -> None:
        """Blocking: until the worker has started (EOFError if it died meanwhile)."""
        if not self._ready:
            self._init.join()
            pickle.loads(_recv(self.proc.stdout))  # ("ready",)
            self._ready = True

    def run(self, blob: bytes) -> Compiled | None:
        """Blocking: compile the pickled constraint `blob` in the worker; None if the worker cannot
        unpickle it (a class only the caller knows). EOFError if the worker is killed meanwhile."""
        self.wait_ready()
        try:
            _send(self.proc.stdin, blob)
        except (BrokenPipeError, ValueError, OSError) as e:
            raise EOFError("the grammar worker exited") from e
        kind, *rest = pickle.loads(_recv(self.proc.stdout))
        if kind == "error":
            error = GrammarError(rest[0], param=rest[1])
            raise mark_recoverable(error) if rest[2] else error
        return Compiled(*rest) if kind == "ok" else None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=5)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def _send(f, blob: bytes) -> None:
    f.write(struct.pack("<Q", len(blob)) + blob)
    f.flush()


def _recv(f) -> bytes:
    head = f.read(8)
    if len(head) < 8:
        raise EOFError("the grammar worker exited")
    (n,) = struct.unpack("<Q", head)
    blob = f.read(n)
    if len(blob) < n:
        raise EOFError("the grammar worker exited")
    return blob


class WorkerPool:
    """Worker processes for one tokenizer, started when first needed and reused; `kill` ends one
    whose compile ran past its deadline, and the next compile starts a fresh one."""

    def __init__(self, info: xgr.TokenizerInfo, *, threads: int, limits: GrammarLimits) -> None:
        self._info_json: str | None = None
        self._info = info
        self._threads, self._limits = threads, limits
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()

    def acquire(self) -> _Worker:
        with self._lock:
            while self._idle:
                w = self._idle.pop()
                if w.alive():
                    return w
            if self._info_json is None:
                self._info_json = self._info.serialize_json()
        return _Worker(self._info_json, self._threads, self._limits)

    def release(self, worker: _Worker) -> None:
        with self._lock:
            self._idle.append(worker)

    def prestart(self) -> None:
        """Start one worker now, so the first compile does not wait for its start."""
        self.release(self.acquire())

    def kill(self, worker: _Worker) -> None:
        """End `worker` (its compile ran past the deadline) and start its replacement."""
        log.info("grammar worker %s killed at its deadline", worker.proc.pid)
        worker.kill()
        self.prestart()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for w in idle:
            w.kill()

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._idle if w.proc.pid is not None]


# Who a compile is for (the server sets the client's address per request): worker restarts are counted
# against it. None: not counted (the SDK, the server's own grammars).
COMPILE_CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("agentrt_compile_client", default=None)


@contextlib.contextmanager
def compile_client(client: str | None) -> Iterator[None]:
    """Compiles started inside (threads and event loops started from here too) are `client`'s."""
    token = COMPILE_CLIENT.set(client)
    try:
        yield
    finally:
        COMPILE_CLIENT.reset(token)


class CompileRateLimitError(OverloadedError):
    """A client's compiles had their workers killed (deadline or disconnect) too often: retry after
    `retry_after` seconds (a 429 with Retry-After, from the server)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RestartBudget:
    """At most `limit` worker kills per client in any `window` seconds: each kill starts a fresh worker
    (an interpreter importing xgrammar), so a client whose grammars keep running past their deadline
    is refused new compiles (`check`) until its oldest kill leaves the window; other clients, and its
    grammars already compiled, are served as before."""

    def __init__(self, limit: int = 4, window: float = 60.0) -> None:
        self.limit, self.window = limit, window
        self._kills: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, client: str | None) -> None:
        if client is None:
            return
        with self._lock:
            kills = self._recent(client)
            if len(kills) < self.limit:
                return
            wait = kills[0] + self.window - time.monotonic()
        raise CompileRateLimitError(
            f"{len(kills)} of this client's grammar compiles were stopped at their deadline in the last "
            f"{self.window:g}s; no new grammar compiles for it for {wait:.0f}s (already compiled ones are "
            "served): simplify the schema or grammar", retry_after=max(wait, 1.0))

    def spend(self, client: str | None) -> None:
        if client is None:
            return
        with self._lock:
            for other in list(self._kills):  # forget the quiet clients (kills are rare: this stays small)
                self._recent(other)
            self._kills.setdefault(client, collections.deque()).append(time.monotonic())

    def _recent(self, client: str) -> collections.deque[float]:
        """`client`'s kills inside the window (a client with none is dropped from the table)."""
        kills = self._kills.get(client, collections.deque())
        while kills and kills[0] <= time.monotonic() - self.window:
            kills.popleft()
        if not kills:
            self._kills.pop(client, None)
        return kills


def _serve(inp, out) -> None:
    try:
        info_json, threads, limits = pickle.loads(_recv(inp))
    except EOFError:  # the server went away while this worker started
        return
    info = xgr.TokenizerInfo.deserialize_json(info_json)
    compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
    _send(out, pickle.dumps(("ready",)))
    while True:
        try:
            blob = _recv(inp)
        except EOFError:
            return
        try:
            constraint = pickle.loads(blob)
        except Exception as e:  # noqa: BLE001 - the caller compiles it itself
            _send(out, pickle.dumps(("unknown", f"{type(e).__name__}: {e}")))
            continue
        try:
            grammar, warnings, compiled, seconds = compile_checked(compiler, constraint, limits)
            blob = compiled.serialize_json() if seconds >= RECOMPILE_BELOW else None
            reply: tuple = ("ok", grammar.serialize_json(), list(warnings), seconds, blob)
        except GrammarError as e:
            reply = ("error", str(e), e.param, recoverable(e))
        except Exception as e:  # noqa: BLE001 - a constraint's own fault: reported to its caller
            reply = ("error", f"cannot build {constraint!r}: {type(e).__name__}: {e}", "grammar")
        _send(out, pickle.dumps(reply))


def compile_checked(compiler: xgr.GrammarCompiler, constraint: Any,
                    limits: GrammarLimits) -> tuple[xgr.Grammar, list[str], xgr.CompiledGrammar, float]:
    """Build `constraint`, check its grammar against `limits` and compile it: (grammar, warnings,
    compiled grammar, compile seconds). A GrammarError that only says xgrammar cannot take the grammar
    (too large, or its compiler refuses it) is `recoverable`: another backend may serve the constraint."""
    grammar, warnings = constraint.build()
    try:
        check_grammar(str(grammar), describe(constraint), limits, param=constraint_param(constraint))
    except GrammarError as e:
        raise mark_recoverable(e) if " is too large" in str(e) else e
    t0 = time.perf_counter()
    try:
        compiled = compiler.compile_grammar(grammar)
    except RuntimeError as e:
        raise mark_recoverable(GrammarError(f"cannot compile {constraint!r}: {e}", param="grammar")) from e
    return grammar, warnings, compiled, time.perf_counter() - t0


def mark_recoverable(error: GrammarError) -> GrammarError:
    """Mark `error` as xgrammar's own limit (size, compiler, deadline), not the constraint's fault."""
    error.xgrammar_only = True
    return error


def recoverable(error: BaseException) -> bool:
    return bool(getattr(error, "xgrammar_only", False))


def constraint_param(constraint: Any) -> str:
    """The request parameter a constraint comes from, for error messages."""
    return {"ToolCalls": "tools", "JsonSchema": "response_format", "Json": "response_format"}.get(
        type(constraint).__name__, "grammar")


def describe(constraint: Any) -> str:
    """A constraint as an error message names it."""
    return {"tools": "the tools' parameter schemas", "response_format": "the JSON schema"}.get(
        constraint_param(constraint), f"the {type(constraint).__name__.lower()} grammar")


def _main() -> None:
    # stdout carries replies only: anything the libraries print goes to stderr
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    logging.basicConfig(level=logging.WARNING)
    _serve(sys.stdin.buffer, channel)


# A worker imports only what a compile needs (a start of seconds, not the ~15 s of all of agentrt):
# `agentrt`, `agentrt.engine` and `agentrt.grammar` stand as bare module objects, each with its folder as
# `__path__` so that its modules import as usual, and their `__init__`s never run (agentrt's brings the
# engine, the grammar package's the compiler and llguidance). xgrammar itself imports torch and
# transformers: that much of the start is unavoidable.
_BOOTSTRAP = """
import sys, types
for name, path in zip(sys.argv[1::2], sys.argv[2::2]):
    package = sys.modules[name] = types.ModuleType(name)
    package.__path__ = [path]
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, package)
"""
_MAIN = _BOOTSTRAP + "from agentrt.grammar._isolate import _main\n_main()\n"
_STUBBED = ("agentrt", "agentrt.engine", "agentrt.grammar")


@functools.cache
def _package_paths() -> list[str]:
    """`_MAIN`'s arguments: each stubbed package's name and folder (found without importing it)."""
    args: list[str] = []
    for name in _STUBBED:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"cannot locate the package {name} for the grammar worker")
        args += [name, list(spec.submodule_search_locations)[0]]
    return args
