"""Engine benchmark: our engine vs transformers `generate` on the same weights, in one process.

Decode ms/token at batch 1 and 8 (greedy, fixed length), prefill tokens/s, peak device memory on
CUDA. Prints a table with ratios; `--json OUT` writes
{"model", "device", "rows": [{"path", "batch", "ms_per_token", "prefill_tok_s", "tok_s"}]}.
Run: `agentrt bench engine [--model smollm2-135m] [--tokens 64] [--json OUT]` from the repo root.
`--overlap both` times our engine with the overlap scheduler off and on, interleaved run by run, as
two rows ("agentrt, overlap off" / "agentrt, overlap on").
`--peer llama.cpp` adds llama.cpp (llama-cpp-python, a benchmark peer only) on the same GGUF, prompt
ids, token count and threads, interleaved with ours, with ratios; `--quant` picks our weights' form.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time

import torch

from agentrt.engine.kv import KVSequence
from agentrt.engine.sampling import SamplingParams
from agentrt.engine.scheduler import Work
from bench.common import machine, model_parser, report, where

log = logging.getLogger(__name__)

PROMPT = ("You are a careful assistant. Read the question, think about which tools you would need, "
          "and answer briefly. Question: which three cities have hosted the Summer Olympics more than once, "
          "and in which years?")


def _prompts(engine, batch: int) -> list[list[int]]:
    # same length, different content, so neither path can share a prefix between rows
    return [engine.chat_prompt([{"role": "user", "content": f"[{i:02d}] {PROMPT}"}]) for i in range(batch)]


def ours_decode(engine, prompts: list[list[int]], tokens: int) -> float:
    """ms per decode step with every row decoding: engine steps counted between the moment the last
    row got its first token (all prefills done) and the first row's finish."""

    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    started: list[int] = []
    marks: dict[str, tuple[float, int]] = {}

    async def one(p):
        first = True
        async for out in engine.stream(p, params):
            if out.token_ids and first:
                first = False
                started.append(1)
                if len(started) == len(prompts):
                    marks["start"] = (time.perf_counter(), engine.steps)
            if out.finish_reason and "end" not in marks:
                marks["end"] = (time.perf_counter(), engine.steps)

    async def run():
        await asyncio.gather(*(one(p) for p in prompts))

    asyncio.run(run())
    (t0, s0), (t1, s1) = marks["start"], marks["end"]
    return (t1 - t0) / max(s1 - s0, 1) * 1000


def ours_prefill(engine, prompt: list[int], repeats: int, salt: int = 0) -> float:
    """Prompt tokens/s of a fresh prefill (each repeat's ids shifted, by `salt` too, so none is cached)."""

    times = []
    for r in range(repeats):
        p = [prompt[0] + 0] + [(t + salt + r + 1) % 40000 + 10 for t in prompt[1:]]  # defeat the prefix cache
        t0 = time.perf_counter()
        engine.generate_sync(p, SamplingParams(max_tokens=1))
        times.append(time.perf_counter() - t0)
    return len(prompt) / statistics.median(times)


class _Stamps:
    """A transformers streamer that records when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.first = True

    def put(self, value) -> None:
        if self.first:  # the prompt
            self.first = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_decode(model, tok, prompts: list[list[int]], tokens: int) -> float:
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    stamps = _Stamps() if len(prompts) == 1 else None
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=tokens,
                       min_new_tokens=tokens, do_sample=False, pad_token_id=pad, streamer=stamps)
    total = time.perf_counter() - t0
    if stamps is not None:
        return (stamps.times[-1] - stamps.times[0]) / (len(stamps.times) - 1) * 1000
    # batched streaming is not supported by transformers: subtract a measured prefill instead
    t1 = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))
    prefill = time.perf_counter() - t1
    return (total - prefill) / (tokens - 1) * 1000


def hf_prefill(model, prompt: list[int], repeats: int) -> float:
    times = []
    ids = torch.tensor([prompt], device=model.device)
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return len(prompt) / statistics.median(times)


def graph_step_ms(engine, batch: int, context: int = 128, repeats: int = 50) -> dict[str, float]:
    """On CUDA: the decode step alone (no scheduling, sampling or streaming), timed with CUDA events:
    the captured graph's replay, the same fused step run eagerly, and the plain forward."""
    pool, graphs = engine.pool, engine.runner.graphs
    seqs = [KVSequence() for _ in range(batch)]
    for s in seqs:
        pool.append(s, context)

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats

    work = [Work.decode(s, 11) for s in seqs]
    out = {"plain forward": timed(lambda: engine.model(engine.runner.build_batch(work), pool.k, pool.v))}
    if graphs is not None:
        graphs.run([(s, [11]) for s in seqs], list(range(batch)))  # inputs in place for the eager run
        out["fused, eager"] = timed(lambda: graphs.replay_eager(batch))
        out["fused, CUDA graph"] = timed(lambda: graphs.run([(s, [11]) for s in seqs], list(range(batch))))
    for s in seqs:
        pool.free(s)
    return out


class LlamaCppPeer:
    """llama.cpp through llama-cpp-python on the GGUF our embedded model comes from (greedy, one sequence)."""

    def __init__(self, gguf_path, threads: int, n_ctx: int = 2048) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf_path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         n_batch=512, verbose=False)

    def decode(self, prompt: list[int], tokens: int) -> float:
        """ms per decode step: between the first generated token and the last, greedy, EOS ignored."""
        stamps = []
        for _ in self.llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == tokens:
                break
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000

    def prefill(self, prompt: list[int]) -> float:
        """tokens/s of one prompt evaluated from an empty cache."""
        self.llm.reset()
        self.llm._ctx.kv_cache_clear() if hasattr(self.llm._ctx, "kv_cache_clear") else None
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        return len(prompt) / (time.perf_counter() - t0)


def peer_unavailable(peer: str, model_name: str) -> str | None:
    """Why the peer cannot run here, or None."""
    if peer != "llama.cpp":
        return f"unknown peer {peer!r} (known: llama.cpp)"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return ("llama_cpp is not importable: pip install ../shared/peers/llama_cpp_python-*.whl "
                "(a benchmark peer only, never a dependency)")
    from agentrt.engine.models import EMBEDDED

    if model_name not in EMBEDDED:
        return f"{model_name} has no GGUF for llama.cpp to run (embedded models: {', '.join(EMBEDDED)})"
    return None


def peer_rows(engine, model_name: str, tokens: int, batches: list[int], repeats: int) -> list[dict]:
    """Ours and llama.cpp, interleaved repeat by repeat: batch-1 decode, prefill of the chat prompt and
    of it four times over, and our larger batches against llama.cpp's batch 1."""
    from agentrt.engine.models import EMBEDDED, fetch_gguf

    peer = LlamaCppPeer(fetch_gguf(model_name, EMBEDDED[model_name]), torch.get_num_threads())
    one = _prompts(engine, 1)[0]
    prompts = {"chat": one, "chat x4": one * 4}
    samples: dict[tuple[str, str], list[float]] = {}

    def add(path: str, what: str, value: float) -> None:
        samples.setdefault((path, what), []).append(value)

    ours_decode(engine, [one], 8)  # warm-up, both
    peer.decode(one, 8)
    for r in range(repeats):
        add("agentrt", "decode b1", ours_decode(engine, [one], tokens))
        add("llama.cpp", "decode b1", peer.decode(one, tokens))
        for name, p in prompts.items():
            add("agentrt", f"prefill {name}", ours_prefill(engine, p, 1, salt=1000 + 7 * r + len(p)))
            add("llama.cpp", f"prefill {name}", peer.prefill(p))
        for batch in batches:
            if batch > 1:
                add("agentrt", f"decode b{batch}", ours_decode(engine, _prompts(engine, batch), tokens))
    rows = []
    for (path, what), values in samples.items():
        v = statistics.median(values)
        row = {"path": path, "what": what, "runs": len(values)}
        if what.startswith("decode"):
            batch = int(what.removeprefix("decode b"))
            row.update(batch=batch, ms_per_token=round(v, 2), tok_s=round(batch * 1000 / v, 1))
        else:
            row.update(prompt_tokens=len(prompts[what.removeprefix("prefill ")]), prefill_tok_s=round(v, 1))
        rows.append(row)
    return rows


def run(model_name: str, tokens: int, batches: list[int], repeats: int, device: str | None,
        dtype: str | None = None, quant: str | None = None, peer: str | None = None,
        transformers: bool = True, overlap: str = "auto") -> dict:
    from transformers import AutoModelForCausalLM

    from agentrt.engine import Engine
    from agentrt.engine.models import resolve_model

    engine = Engine.load(model_name, device=device, dtype=dtype, quant=quant)
    peer_note, peers = None, []
    if peer:
        peer_note = peer_unavailable(peer, model_name)
        if peer_note is None:
            peers = peer_rows(engine, model_name, tokens, batches, repeats)
        else:
            log.warning("peer %s skipped: %s", peer, peer_note)
    dev = engine.device
    tok = engine.tokenizer
    rows = []
    long_prompt = _prompts(engine, 1)[0] * 4
    modes = {"auto": {"agentrt": engine.overlap}, "on": {"agentrt": True}, "off": {"agentrt": False},
             "both": {"agentrt, overlap off": False, "agentrt, overlap on": True}}[overlap]
    ours_pf = ours_prefill(engine, long_prompt, repeats)
    for batch in batches:
        if transformers and batch == batches[0]:
            hf = AutoModelForCausalLM.from_pretrained(resolve_model(model_name), dtype=engine.model.embed.weight.dtype)
            hf = hf.to(dev).eval()
            hf_pf = hf_prefill(hf, long_prompt, repeats)
        prompts = _prompts(engine, batch)
        ours_decode(engine, prompts, 8)  # warm-up
        ours: dict[str, list[float]] = {path: [] for path in modes}
        for _ in range(repeats):  # the overlap modes interleaved, run by run (the machine may be shared)
            for path, on in modes.items():
                engine.overlap = on
                ours[path].append(ours_decode(engine, prompts, tokens))
        for path, times in ours.items():
            ms = statistics.median(times)
            rows.append({"path": path, "batch": batch, "ms_per_token": round(ms, 2),
                         "prefill_tok_s": round(ours_pf, 1), "tok_s": round(batch * 1000 / ms, 1)})
        if transformers:
            hf_ms = statistics.median(hf_decode(hf, tok, prompts, tokens) for _ in range(repeats))
            rows.append({"path": "transformers", "batch": batch, "ms_per_token": round(hf_ms, 2),
                         "prefill_tok_s": round(hf_pf, 1), "tok_s": round(batch * 1000 / hf_ms, 1)})
    steps = []
    if dev.type == "cuda":
        for batch in batches:
            for path, ms in graph_step_ms(engine, batch).items():
                steps.append({"path": path, "batch": batch, "ms_per_step": round(ms, 3)})
    engine.close()
    return {"model": model_name, **machine(engine), "quant": _quant_of(engine.model), "steps": steps,
            "peer": peer, "peer_skipped": peer_note, "peer_rows": peers,
            "prompt_tokens": len(_prompts(engine, 1)[0]), "prefill_prompt_tokens": len(long_prompt),
            "decode_tokens": tokens, "rows": rows}


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    if not result["rows"]:
        return
    t = Table(title=f"engine: {result['model']} ({where(result)}, quant {result.get('quant')})")
    for col in ("batch", "path", "ms/step", "tok/s", "prefill tok/s", "speedup vs transformers"):
        t.add_column(col, justify="right")
    by = {(r["path"], r["batch"]): r for r in result["rows"]}
    for (path, batch), r in by.items():
        ref = by.get(("transformers", batch))
        t.add_row(str(batch), path, f"{r['ms_per_token']:.1f}", f"{r['tok_s']:.1f}", f"{r['prefill_tok_s']:.0f}",
                  f"{ref['ms_per_token'] / r['ms_per_token']:.2f}x" if ref else "-")
    one = by.get(("agentrt", 1))
    Console().print(t)
    if result.get("steps"):
        st = Table(title="decode step alone (CUDA events; context 128 tokens per row)")
        for col in ("batch", "path", "ms/step"):
            st.add_column(col, justify="right")
        for r in result["steps"]:
            st.add_row(str(r["batch"]), r["path"], f"{r['ms_per_step']:.3f}")
        Console().print(st)
    for batch in sorted({b for _, b in by}):
        if one and batch > 1:
            Console().print(f"agentrt batch {batch} aggregate throughput: "
                            f"{by[('agentrt', batch)]['tok_s'] / one['tok_s']:.2f}x batch 1")


def _quant_of(model) -> str:
    from agentrt.engine.quant import Int4Weight, Int8Weight

    kinds = {type(layer.mlp.down.weight) for layer in model.layers}
    return "int4 (GGUF blocks)" if Int4Weight in kinds else "int8" if Int8Weight in kinds else "none"


def print_peer_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if result.get("peer_skipped"):
        con.print(f"peer {result['peer']} skipped: {result['peer_skipped']}")
    rows = result.get("peer_rows") or []
    if not rows:
        return
    t = Table(title=f"agentrt ({result.get('quant')}) vs {result['peer']}, same GGUF, prompt ids, tokens and "
                    f"threads, interleaved ({where(result)})")
    for col in ("measure", "agentrt", result["peer"], "ratio (agentrt / peer)"):
        t.add_column(col, justify="right")
    by = {(r["path"], r["what"]): r for r in rows}
    peer_b1 = by[(result["peer"], "decode b1")]["tok_s"]
    for (path, what), r in by.items():
        if path != "agentrt":
            continue
        key = "tok_s" if what.startswith("decode") else "prefill_tok_s"
        other = by.get((result["peer"], what))
        if other is None:  # our larger batches: aggregate tok/s against the peer's batch 1
            t.add_row(f"{what} aggregate tok/s (peer: b1)", f"{r[key]:.1f}", f"{peer_b1:.1f}", f"{r[key] / peer_b1:.2f}x")
            continue
        label = f"{what} tok/s" + (f" ({r['prompt_tokens']} tokens)" if "prompt_tokens" in r else "")
        t.add_row(label, f"{r[key]:.1f}", f"{other[key]:.1f}", f"{r[key] / other[key]:.2f}x")
    con.print(t)


def main(argv: list[str] | None = None) -> int:
    from agentrt.engine.quant import QUANT_CHOICES

    ap = model_parser("engine", __doc__, repeats=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--quant", choices=QUANT_CHOICES, default="auto",
                    help="our weights: the GGUF's blocks, int8 per row, or dense (auto: gguf on the CPU when there is one)")
    ap.add_argument("--peer", choices=["llama.cpp"], default=None,
                    help="add another engine's rows on the same GGUF (skipped, saying why, when it is not installed)")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers rows")
    ap.add_argument("--overlap", choices=["auto", "on", "off", "both"], default="auto",
                    help="the overlap scheduler for our rows (both: off and on, interleaved; auto: the engine's default)")
    args = ap.parse_args(argv)
    result = run(args.model, args.tokens, args.batch, args.repeats, args.device, args.dtype, args.quant, args.peer,
                 transformers=not args.no_transformers, overlap=args.overlap)
    return report(result, lambda r: (print_table(r), print_peer_table(r)), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
