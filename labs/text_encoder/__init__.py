"""The text encoder shared by every conditional model: a word tokenizer and a small Transformer.

    tokenizer = Tokenizer(data_info.vocab, max_length=cfg.max_length)
    encoder = TextEncoder(cfg, tokenizer.vocab_size)
    text = encode_prompts(tokenizer, encoder, ["a red circle", ""])  # "" = unconditional
    text.tokens  # (B, L, C)   text.mask  # (B, L)   text.pooled  # (B, C)
"""

from .model import (
    MLP,
    Block,
    MultiHeadSelfAttention,
    TextEncoder,
    TextEncoderConfig,
    TextEncoding,
    encode_prompts,
    scaled_dot_product_attention,
)
from .tokenizer import TokenBatch, Tokenizer, words

__all__ = [
    "MLP",
    "Block",
    "MultiHeadSelfAttention",
    "TextEncoder",
    "TextEncoderConfig",
    "TextEncoding",
    "TokenBatch",
    "Tokenizer",
    "encode_prompts",
    "scaled_dot_product_attention",
    "words",
]
