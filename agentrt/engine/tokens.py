"""Text in and out of token ids: the chat template, the incremental detokeniser, stop strings."""

from __future__ import annotations

from agentrt.errors import InvalidRequestError

__all__ = ["template_ids", "prompt_ids", "Detokenizer", "StopChecker"]


def template_ids(tokenizer, messages: list[dict], **template_kwargs) -> list[int]:
    """Token ids of `messages` under `tokenizer`'s chat template, ready for the assistant's turn."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                        **template_kwargs)
    if isinstance(out, dict) or hasattr(out, "input_ids"):  # some tokenizers return a BatchEncoding anyway
        out = out["input_ids"]
    return list(out)


def prompt_ids(tokenizer, prompt: str | list[int], vocab_size: int) -> list[int]:
    """A prompt as token ids: text encoded without special tokens, or ids checked against the vocabulary."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=False)
    if not prompt or any(not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt):
        raise InvalidRequestError("prompt token ids must be a non-empty list of ids within the vocabulary",
                                  param="prompt")
    return list(prompt)


class Detokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character."""

    def __init__(self, tokenizer) -> None:
        backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's Rust core
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)  # same text, a third of the cost
        else:
            self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            # the previous chunk stays as left context so merges across the boundary decode right
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""


class StopChecker:
    """Accumulates text; finds stop strings and holds back a tail that could still become one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        """Add decoded text; return what can be shown now."""
        self.text += delta
        if self.stops:
            window = max(0, self.emitted - max(map(len, self.stops)))
            hits = [i for i in (self.text.find(s, window) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                return self.flush()
            hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        else:
            hold = 0
        end = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted:end], end
        return out

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out
