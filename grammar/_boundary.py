"""Jump-forward that keeps token boundaries (token healing, as in Guidance and llguidance's forced
tokens): text the grammar forces is committed as tokens only up to the earliest point where a token
of the vocabulary could start inside it and run past its end; the rest is left to the sampler under
the mask, so the model still writes the canonical token that joins forced text and its own (`":`
then `' -'`, never `":` + a lone `' '` that no negative number can follow).
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

    def safe_length(self, data: bytes) -> int:
        """Bytes of `data` no token can straddle: before its earliest suffix that begins a longer token."""
        n = len(data)
        for k in range(max(0, n - self.max_len + 1), n):
            if data[k:] in self.prefixes:
                return k
        return n

    def commit(self, forced: str, ids: Sequence[int]) -> list[int]:
        """The leading tokens of `ids` (the canonical tokenisation of `forced`) that end at or before
        the safe length; none when `ids` do not spell `forced` byte for byte."""
        data = forced.encode("utf-8")
        pieces = [self.vocab[i] if 0 <= i < len(self.vocab) else b"" for i in ids]
        if b"".join(pieces) != data:
            return []
        safe, end, out = self.safe_length(data), 0, []
        for i, piece in zip(ids, pieces):
            end += len(piece)
            if end > safe:
                break
            out.append(int(i))
        return out
