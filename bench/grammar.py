"""Grammar benchmark: what constrained decoding costs, on our engine and on transformers + xgrammar.

One process, same weights and prompt: our engine unconstrained, constrained with the mask filled
while the forward runs (overlap), constrained with the mask filled before the forward, and
transformers `generate` with xgrammar's HF logits processor. Decode ms/token at batch 1 and 8;
mask-fill time per token (p50/p99). `--json OUT` writes
{"rows": [{"path", "batch", "ms_per_token"}], "mask_us": {"p50", "p99"}}.
Run: `agentrt bench grammar [--model smollm2-135m] [--tokens 64] [--json OUT]` from the repo root.
`--overlap both` runs each of our paths with the overlap scheduler off and on, interleaved run by run
(rows ", scheduler off" / ", scheduler on"; each row's "overlap_scheduler" says which).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import torch

from bench.common import machine, model_parser, report, where

SCHEMA = {"type": "object", "properties": {
    "fruits": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "colour": {"type": "string"}, "sweet": {"type": "boolean"}},
        "required": ["name", "colour", "sweet"]}}},
    "required": ["fruits"]}
QUESTION = "List twenty fruits with their colour and whether they are sweet, as JSON."


def _engine_ms(engine, prompts, params, matcher_factory) -> tuple[float, int]:
    """Decode ms per generated token (after the first) over all rows, and tokens generated."""
    async def one(p):
        stamps, n = [], 0
        async for out in engine.stream(p, params, matcher_factory() if matcher_factory else None):
            if out.token_ids:
                stamps.append((time.perf_counter(), len(out.token_ids)))
                n += len(out.token_ids)
        return stamps, n

    async def run():
        return await asyncio.gather(*(one(p) for p in prompts))

    results = asyncio.run(run())
    start = max(s[0][0] for s, _ in results)
    end = max(s[-1][0] for s, _ in results)
    tokens = sum(sum(k for t, k in s if t > start) for s, _ in results) / len(prompts)
    return (end - start) / max(tokens, 1) * 1000, int(sum(n for _, n in results))


def _hf_ms(model, tok, prompt, tokens, processor) -> float:
    class Stamps:
        def __init__(self):
            self.times, self.first = [], True

        def put(self, value):
            if self.first:
                self.first = False
            else:
                self.times.append(time.perf_counter())

        def end(self):
            pass

    s = Stamps()
    with torch.inference_mode():
        model.generate(input_ids=torch.tensor([prompt], device=model.device), max_new_tokens=tokens,
                       do_sample=False, streamer=s, logits_processor=[processor] if processor else None,
                       pad_token_id=tok.eos_token_id)
    return (s.times[-1] - s.times[0]) / max(len(s.times) - 1, 1) * 1000


def run(model_name: str, tokens: int, batches: list[int], repeats: int, device: str | None = None,
        dtype: str | None = None, overlap: str = "auto") -> dict:
    import xgrammar
    from transformers import AutoModelForCausalLM
    from xgrammar.contrib.hf import LogitsProcessor

    from agentrt.engine import Engine
    from agentrt.grammar import GrammarCompiler, JsonSchema, Matcher
    from agentrt.engine.models import resolve_model
    from agentrt.engine.sampling import SamplingParams

    engine = Engine.load(model_name, device=device, dtype=dtype)
    default_overlap = engine.masks.overlap
    schedulers = {"auto": [("", engine.overlap)], "on": [("", True)], "off": [("", False)],
                  "both": [(", scheduler off", False), (", scheduler on", True)]}[overlap]
    dev, dtype = engine.device, engine.model.embed.weight.dtype
    compiler = GrammarCompiler(engine.tokenizer, vocab_size=engine.vocab_size)
    compiled = compiler.compile(JsonSchema(SCHEMA))
    stop = sorted(engine.eos_token_ids)
    rows = []
    for batch in batches:
        prompts = [engine.chat_prompt([{"role": "user", "content": f"({i}) {QUESTION}"}]) for i in range(batch)]
        free = SamplingParams(max_tokens=tokens, ignore_eos=True)
        bound = SamplingParams(max_tokens=tokens)
        for factory in (None, lambda: Matcher(compiled, stop_token_ids=stop)):  # warm-up (JIT, graphs)
            _engine_ms(engine, prompts, SamplingParams(max_tokens=8), factory)
        paths = [(path + suffix, params, factory, mask_overlap, scheduler) for suffix, scheduler in schedulers
                 for path, params, factory, mask_overlap in (
                     ("agentrt unconstrained", free, None, True),
                     ("agentrt constrained, overlap", bound, lambda: Matcher(compiled, stop_token_ids=stop), True),
                     ("agentrt constrained, no overlap", bound, lambda: Matcher(compiled, stop_token_ids=stop), False))]
        times: dict[str, list[float]] = {p[0]: [] for p in paths}
        for _ in range(repeats):  # interleaved, run by run: the machine may be shared
            for path, params, factory, mask_overlap, scheduler in paths:
                engine.masks.overlap, engine.overlap = mask_overlap, scheduler
                times[path].append(_engine_ms(engine, prompts, params, factory)[0])
        for path, _, _, _, scheduler in paths:
            rows.append({"path": path, "batch": batch, "ms_per_token": round(statistics.median(times[path]), 2),
                         "overlap_scheduler": scheduler})
    engine.masks.overlap = default_overlap
    mask = sorted(engine.masks.seconds)
    hf = AutoModelForCausalLM.from_pretrained(resolve_model(model_name), dtype=dtype).to(dev).eval()
    prompt = engine.chat_prompt([{"role": "user", "content": QUESTION}])
    hf_compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(
        engine.tokenizer, vocab_size=engine.vocab_size))
    hf_compiled = hf_compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                  separators=(",", ":"))
    for path, proc in (("transformers", None), ("transformers + xgrammar", "x")):
        ms = statistics.median(
            _hf_ms(hf, engine.tokenizer, prompt, tokens, LogitsProcessor(hf_compiled) if proc else None)
            for _ in range(repeats))
        rows.append({"path": path, "batch": 1, "ms_per_token": round(ms, 2)})
    engine.close()
    pct = (lambda q: round(mask[min(len(mask) - 1, int(q * len(mask)))] * 1e6, 1)) if mask else (lambda q: None)
    return {"model": model_name, **machine(engine), "tokens": tokens,
            "rows": rows, "mask_us": {"p50": pct(0.5), "p99": pct(0.99)}}


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"grammar: {result['model']} ({where(result)})")
    for col in ("batch", "path", "ms/token", "vs unconstrained"):
        t.add_column(col, justify="right")
    base = {(r["batch"], r.get("overlap_scheduler")): r["ms_per_token"] for r in result["rows"]
            if r["path"].startswith("agentrt unconstrained")}
    for r in result["rows"]:
        ref = base.get((r["batch"], r.get("overlap_scheduler")))
        t.add_row(str(r["batch"]), r["path"], f"{r['ms_per_token']:.1f}",
                  f"{r['ms_per_token'] / ref:.3f}x" if ref else "")
    Console().print(t)
    Console().print(f"mask fill per token: p50 {result['mask_us']['p50']} us, p99 {result['mask_us']['p99']} us")


def main(argv: list[str] | None = None) -> int:
    ap = model_parser("grammar", __doc__, repeats=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--overlap", choices=["auto", "on", "off", "both"], default="auto",
                    help="the overlap scheduler for our rows (both: off and on, interleaved; auto: the engine's default)")
    args = ap.parse_args(argv)
    result = run(args.model, args.tokens, args.batch, args.repeats, args.device, args.dtype, args.overlap)
    return report(result, print_table, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
