"""A word-level tokenizer for short captions ("a small red circle at the top left").

The captions of the lab's datasets use a few dozen words, so a vocabulary of whole
lower-cased words is enough and keeps every token readable. A prompt becomes

    [CLS] w_1 w_2 ... w_n        (at most ``max_length`` tokens, [CLS] included)

and a batch of prompts is right-padded with [PAD] to its longest member, with a boolean
mask that is True on real tokens. The empty prompt is just ``[CLS]``: it is the
"unconditional" prompt that classifier-free guidance needs.

Training captions repeat (every caption of the dataset is drawn many times), so a tokenizer
remembers the ids of the prompts it has encoded through ``__call__``: a dict from text to ids,
at most ``cache_size`` entries, emptied when full. It is a cache only: not part of
``state_dict``, and ``encode`` itself always tokenises afresh.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch

_WORD_PATTERN = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased words of ``text``: maximal runs of ``[a-z0-9]``, everything else splits.

    >>> words("A small, RED circle!")
    ['a', 'small', 'red', 'circle']
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}: {text!r}")
    return _WORD_PATTERN.findall(text.lower())


class TokenBatch(NamedTuple):
    """A padded batch of token ids. Unpacks as ``ids, mask = tokenizer(prompts)``."""

    ids: torch.Tensor  # (B, L) long, [PAD] after the end of each prompt
    mask: torch.Tensor  # (B, L) bool, True on real tokens ([CLS] included)

    def to(self, device: torch.device | str | None) -> "TokenBatch":
        return TokenBatch(self.ids.to(device), self.mask.to(device))


class Tokenizer:
    """Maps captions to token ids and back, over a fixed word vocabulary.

    ``vocab`` is the full list of tokens: the special tokens ``SPECIALS`` first, in that
    order, then the words (see :meth:`build_vocab`). Token id ``i`` is ``vocab[i]``.
    ``cache_size`` bounds the memo of encoded prompts that :meth:`__call__` keeps (0: none).
    """

    PAD, UNK, CLS = "[PAD]", "[UNK]", "[CLS]"
    SPECIALS: tuple[str, ...] = (PAD, UNK, CLS)
    PAD_ID, UNK_ID, CLS_ID = 0, 1, 2

    def __init__(self, vocab: Sequence[str], max_length: int, cache_size: int = 100_000):
        vocab = list(vocab)
        n_special = len(self.SPECIALS)
        if tuple(vocab[:n_special]) != self.SPECIALS:
            raise ValueError(
                f"vocab must start with the special tokens {list(self.SPECIALS)} in this order, "
                f"got {vocab[:n_special]}"
            )
        for token in vocab:
            if not isinstance(token, str):
                raise ValueError(f"vocab entries must be str, got {type(token).__name__}: {token!r}")
        duplicates = sorted(token for token, count in Counter(vocab).items() if count > 1)
        if duplicates:
            raise ValueError(f"vocab has duplicate tokens: {duplicates}")
        # a vocabulary word that `words` can never produce could never be encoded
        unreachable = [token for token in vocab[n_special:] if words(token) != [token]]
        if unreachable:
            raise ValueError(
                f"vocab words must be lower-case runs of [a-z0-9] (what `words` yields), "
                f"got {unreachable}"
            )
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int ([CLS] included), got {max_length!r}")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0 (0: no cache), got {cache_size!r}")
        self.vocab: list[str] = vocab
        self.max_length = max_length
        self.token_to_id: dict[str, int] = {token: index for index, token in enumerate(vocab)}
        self.cache_size = cache_size
        self._ids_cache: dict[str, tuple[int, ...]] = {}  # text -> encode(text), see the module docstring

    @classmethod
    def build_vocab(cls, captions: Iterable[str], min_count: int = 1) -> list[str]:
        """Special tokens, then the sorted words that occur at least ``min_count`` times."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(word for caption in captions for word in words(caption))
        return list(cls.SPECIALS) + sorted(word for word, count in counts.items() if count >= min_count)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """``[CLS]`` then one id per word (unknown words -> ``[UNK]``), at most ``max_length`` ids."""
        ids = [self.CLS_ID] + [self.token_to_id.get(word, self.UNK_ID) for word in words(text)]
        if len(ids) > self.max_length:
            warnings.warn(
                f"prompt {text!r} has {len(ids)} tokens ([CLS] included), more than "
                f"max_length={self.max_length}; it was truncated to {self.max_length} tokens",
                stacklevel=2,
            )
            ids = ids[: self.max_length]
        return ids

    def _cached_ids(self, text: str) -> tuple[int, ...]:
        """``encode(text)``, remembered. A truncated prompt warns the first time it is seen only."""
        ids = self._ids_cache.get(text)
        if ids is None:
            ids = tuple(self.encode(text))
            if self.cache_size:
                if len(self._ids_cache) >= self.cache_size:
                    self._ids_cache.clear()  # simpler than LRU; a caption set that fits never gets here
                self._ids_cache[text] = ids
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Words of ``ids`` joined by spaces; ``[PAD]`` and ``[CLS]`` are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        out = []
        for index in ids:
            index = int(index)
            if not 0 <= index < self.vocab_size:
                raise ValueError(f"token id {index} is outside the vocabulary [0, {self.vocab_size})")
            if index not in (self.PAD_ID, self.CLS_ID):
                out.append(self.vocab[index])
        return " ".join(out)

    def __call__(
        self, texts: str | Sequence[str], device: torch.device | str | None = None
    ) -> TokenBatch:
        """Encode a prompt or a list of prompts into a padded :class:`TokenBatch` of shape (B, L).

        L is the length of the longest encoded prompt (so at least 1 and at most ``max_length``).
        Each prompt's ids come from the memo when it was seen before (a long prompt warns once).
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"expected a str or a list of str, got {type(texts).__name__}")
        bad = [text for text in texts if not isinstance(text, str)]
        if bad:
            raise TypeError(f"every prompt must be a str, got {[type(b).__name__ for b in bad]}")
        if not texts:
            raise ValueError("cannot tokenize an empty list of prompts")
        encoded = [self._cached_ids(text) for text in texts]
        length = max(len(ids) for ids in encoded)
        padded = [list(sequence) + [self.PAD_ID] * (length - len(sequence)) for sequence in encoded]
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda":
            # A blocking copy from pageable memory waits for the GPU's queue (a host-device sync, once per
            # tokenised batch). From pinned memory with non_blocking it is queued on the stream like a kernel;
            # the caching host allocator keeps the pinned block until the copy has run.
            ids = torch.tensor(padded, dtype=torch.long).pin_memory().to(device, non_blocking=True)  # (B, L)
        else:
            ids = torch.tensor(padded, dtype=torch.long, device=device)  # (B, L), built where it is used
        mask = ids != self.PAD_ID  # (B, L), on ids' device (one transfer, not two); [PAD] never occurs in a prompt
        return TokenBatch(ids, mask)

    def state_dict(self) -> dict[str, Any]:
        """Plain Python types only, so it can be saved in a checkpoint and loaded with weights_only."""
        return {"vocab": list(self.vocab), "max_length": self.max_length}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "Tokenizer":
        return cls(vocab=state["vocab"], max_length=state["max_length"])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, max_length={self.max_length})"
