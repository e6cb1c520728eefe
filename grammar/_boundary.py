"""Jump-forward that keeps token boundaries (token healing, as in Guidance and llguidance's forced
tokens): text the grammar forces is committed as tokens only up to the earliest point where a token
of the vocabulary could start inside it and run past its end; the rest is left to the sampler under
the mask, so the model still writes the canonical token that joins forced text and its own (`":`
then `' -'`, never `":` + a lone `' '` that no negative number can follow).

What is left to the sampler is still forced text, so a token that spells only part of its first
canonical token is masked (`strict_prefixes`): a model that wants a number where the grammar forces a
string (`"expression":` then `' '` for `17`) would otherwise take the lone `' '`, a tokenisation of
`' "'` it never saw in training, and lose its way inside the string that must follow.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["TokenBoundaries"]


class TokenBoundaries:
    """The vocabulary's proper token prefixes, to find where forced text can safely stop."""

    def __init__(self, decoded_vocab: Sequence[bytes]) -> None:
        self.vocab = list(decoded_vocab)
        self.prefixes: set[bytes] = set()
        for t in self.vocab:
            for i in range(1, len(t)):
                self.prefixes.add(t[:i])
        self.max_len = max((len(t) for t in self.vocab), default=1)
        self._ids: dict[bytes, list[int]] | None = None  # bytes -> the tokens spelling them (built on first use)

    def strict_prefixes(self, token: int) -> list[int]:
        """The tokens whose bytes are a proper, non-empty prefix of `token`'s."""
        if self._ids is None:
            self._ids = {}
            for i, t in enumerate(self.vocab):
                if t:
                    self._ids.setdefault(t, []).append(i)
        piece = self.vocab[token] if 0 <= token < len(self.vocab) else b""
        return [i for k in range(1, len(piece)) for i in self._ids.get(piece[:k], ())]

    def safe_length(self, data: bytes) -> int:
        """Bytes of `data` no token can straddle: before its earliest suffix that begins a longer token."""
        n = len(data)
        for k in range(max(0, n - self.max_len + 1), n):
            if data[k:] in self.prefixes:
                return k
        return n

    def spells(self, forced: str, ids: Sequence[int]) -> bool:
        """Whether `ids` spell `forced` byte for byte."""
        return b"".join(self.vocab[i] if 0 <= i < len(self.vocab) else b"" for i in ids) == forced.encode("utf-8")

    def commit(self, forced: str, ids: Sequence[int]) -> list[int]:
        """The leading tokens of `ids` (the canonical tokenisation of `forced`) that end at or before
        the safe length; none when `ids` do not spell `forced` byte for byte."""
        if not self.spells(forced, ids):
            return []
        data = forced.encode("utf-8")
        pieces = [self.vocab[i] for i in ids]
        safe, end, out = self.safe_length(data), 0, []
        for i, piece in zip(ids, pieces):
            end += len(piece)
            if end > safe:
                break
            out.append(int(i))
        return out
