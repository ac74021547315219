"""Caption text helpers shared by every dataset: words, the vocabulary, articles, templates.

Captions come from a few templates per dataset, filled with attribute names
("a small red circle at the top left", "a photo of a sneaker"). The tokenizer of
``labs.text_encoder`` works on whole lower-cased words, so the vocabulary is

    ["[PAD]", "[UNK]", "[CLS]"] + sorted({w for caption in corpus for w in words(caption)})

where the corpus is every caption a dataset can produce (:meth:`CaptionedDataset.caption_corpus`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]")  # ids 0, 1, 2, in this order
_WORD = re.compile(r"[a-z0-9]+")  # a word: a maximal run of lower-case letters and digits
_A_BEFORE_VOWEL = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")  # "a orange" -> "an orange"


def words(text: str) -> list[str]:
    """Lower-cased words of ``text``; anything that is not a letter or digit splits.

    >>> words("A small, RED t-shirt/top!")
    ['a', 'small', 'red', 't', 'shirt', 'top']
    """
    return _WORD.findall(text.lower())


def build_vocab(captions: Iterable[str]) -> list[str]:
    """The tokenizer vocabulary: the special tokens, then the sorted unique words of ``captions``."""
    unique = sorted({word for caption in captions for word in words(caption)})
    return list(SPECIAL_TOKENS) + unique


def fix_articles(text: str) -> str:
    """Use "an" before a vowel: templates always write "a {colour} ..." ("an orange circle")."""
    return _A_BEFORE_VOWEL.sub(lambda match: match.group(1) + "n ", text)


def pick_template(seed: int, index: int, num_templates: int) -> int:
    """Which caption template item ``index`` uses: a seeded hash, so it never depends on data order.

    ``blake2b(f"{seed}/{index}") mod num_templates`` is the same on every machine and run
    (Python's own ``hash`` of a string is salted per process, so it cannot be used here).
    """
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_templates
