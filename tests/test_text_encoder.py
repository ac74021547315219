"""Tests of the shared text encoder: tokenizer, attention, Transformer encoder."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from labs.text_encoder import (
    MultiHeadSelfAttention,
    TextEncoder,
    TextEncoderConfig,
    TextEncoding,
    TokenBatch,
    Tokenizer,
    encode_prompts,
    scaled_dot_product_attention,
    words,
)

CAPTIONS = [
    "A small red circle at the top left",
    "a big blue square, bottom right",
    "green triangle in the centre",
]
LONG_PROMPT = "a small red circle and a big blue square and a green triangle at the top left of the centre"


@pytest.fixture
def tokenizer() -> Tokenizer:
    return Tokenizer(Tokenizer.build_vocab(CAPTIONS), max_length=8)


def tiny_encoder(vocab_size: int, seed: int = 0, **overrides) -> TextEncoder:
    torch.manual_seed(seed)
    cfg = TextEncoderConfig(**{"dim": 32, "depth": 2, "heads": 4, "max_length": 24, **overrides})
    return TextEncoder(cfg, vocab_size).eval()


# ----------------------------------------------------------------------------- tokenizer


def test_words_rule():
    assert words("A small, RED circle!") == ["a", "small", "red", "circle"]
    assert words("top-left 3x") == ["top", "left", "3x"]
    assert words("  ,; ") == []


def test_build_vocab_order():
    vocab = Tokenizer.build_vocab(["b a", "c a", "a"])
    assert vocab == ["[PAD]", "[UNK]", "[CLS]", "a", "b", "c"]
    assert Tokenizer.build_vocab(["b a", "c a", "a"], min_count=2) == ["[PAD]", "[UNK]", "[CLS]", "a"]
    assert (Tokenizer.PAD_ID, Tokenizer.UNK_ID, Tokenizer.CLS_ID) == (0, 1, 2)
    tok = Tokenizer(vocab, max_length=4)
    assert tok.vocab_size == 6
    assert tok.encode("c b") == [2, 5, 4]


def test_round_trip(tokenizer):
    for caption in ["a red circle", "Green TRIANGLE, top!", "bottom right"]:
        assert tokenizer.decode(tokenizer.encode(caption)) == " ".join(words(caption))


def test_unknown_word(tokenizer):
    ids = tokenizer.encode("a purple circle")
    assert ids[0] == Tokenizer.CLS_ID
    assert ids[2] == Tokenizer.UNK_ID
    assert tokenizer.decode(ids) == "a [UNK] circle"


def test_empty_prompt(tokenizer):
    assert tokenizer.encode("") == [Tokenizer.CLS_ID]
    assert tokenizer.decode([Tokenizer.CLS_ID]) == ""
    ids, mask = tokenizer("")
    assert ids.tolist() == [[Tokenizer.CLS_ID]]
    assert mask.tolist() == [[True]]


def test_truncation_warns_once(tokenizer):
    with pytest.warns(UserWarning, match="max_length=8") as record:
        ids = tokenizer.encode(LONG_PROMPT)
    assert len(record) == 1
    assert "a small red circle" in str(record[0].message)
    assert len(ids) == 8
    assert tokenizer.decode(ids) == "a small red circle [UNK] a big"  # "and" is not in the vocab
    with pytest.warns(UserWarning):
        batch = tokenizer(["a red circle", LONG_PROMPT])
    assert batch.ids.shape == (2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer.encode("a red circle")  # within the limit: no warning


def test_batch_padding_and_mask(tokenizer):
    batch = tokenizer(["a red circle", "", "green triangle"])
    assert isinstance(batch, TokenBatch)
    assert batch.ids.dtype == torch.long and batch.mask.dtype == torch.bool
    a, red, circle = (tokenizer.token_to_id[w] for w in ("a", "red", "circle"))
    green, triangle = tokenizer.token_to_id["green"], tokenizer.token_to_id["triangle"]
    assert batch.ids.tolist() == [[2, a, red, circle], [2, 0, 0, 0], [2, green, triangle, 0]]
    assert batch.mask.tolist() == [
        [True, True, True, True],
        [True, False, False, False],
        [True, True, True, False],
    ]
    ids, mask = tokenizer("a red circle")  # a single string is a batch of one
    assert ids.shape == mask.shape == (1, 4)


def padded_reference(tokenizer: Tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[bool]]]:
    """The uncached path: ``encode`` each prompt, right-pad with [PAD] to the longest."""
    encoded = [tokenizer.encode(text) for text in texts]
    length = max(len(ids) for ids in encoded)
    ids = [ids + [Tokenizer.PAD_ID] * (length - len(ids)) for ids in encoded]
    return ids, [[index < len(row) for index in range(length)] for row in encoded]


def test_cached_call_matches_encode(tokenizer):
    texts = ["a red circle", "", "a red circle", "Green TRIANGLE, top!", "a purple circle", "", "a red circle"]
    state = tokenizer.state_dict()
    expected_ids, expected_mask = padded_reference(tokenizer, texts)
    for _ in range(2):  # the second call reads every prompt from the memo
        ids, mask = tokenizer(texts)
        assert ids.dtype == torch.long and mask.dtype == torch.bool
        assert ids.tolist() == expected_ids and mask.tolist() == expected_mask
    assert len(tokenizer._ids_cache) == 4  # one entry per distinct prompt
    assert tokenizer(["a red circle"]).ids.tolist() == [tokenizer.encode("a red circle")]  # shorter batch, no pad
    assert tokenizer.state_dict() == state  # the memo is not state


def test_cache_is_bounded():
    tok = Tokenizer(Tokenizer.build_vocab(CAPTIONS), max_length=8, cache_size=2)
    for text in ["a", "a red", "a red circle"]:
        assert tok(text).ids.tolist() == [tok.encode(text)]
    assert list(tok._ids_cache) == ["a red circle"]  # emptied when full, then filled again
    uncached = Tokenizer(tok.vocab, max_length=8, cache_size=0)
    assert uncached(["a red", "a red"]).ids.tolist() == [tok.encode("a red")] * 2 and not uncached._ids_cache
    with pytest.raises(ValueError, match="cache_size"):
        Tokenizer(tok.vocab, max_length=8, cache_size=-1)


def test_truncation_warns_through_the_cache(tokenizer):
    with pytest.warns(UserWarning, match="max_length=8"):
        first = tokenizer([LONG_PROMPT, "a red circle"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a repeat may or may not warn again; the ids must not change
        again = tokenizer([LONG_PROMPT, "a red circle"])
        expected_ids, _ = padded_reference(tokenizer, [LONG_PROMPT, "a red circle"])
    assert first.ids.tolist() == again.ids.tolist() == expected_ids
    assert first.ids.shape == (2, 8)


def test_state_dict_round_trip(tokenizer):
    state = tokenizer.state_dict()
    assert state == {"vocab": tokenizer.vocab, "max_length": 8}
    assert all(isinstance(w, str) for w in state["vocab"])
    clone = Tokenizer.from_state_dict(state)
    assert clone.vocab == tokenizer.vocab and clone.max_length == tokenizer.max_length
    assert clone.encode("a purple circle") == tokenizer.encode("a purple circle")


@pytest.mark.parametrize(
    "vocab",
    [
        ["a", "b"],  # no specials
        ["[UNK]", "[PAD]", "[CLS]", "a"],  # misplaced
        ["[PAD]", "[UNK]", "[CLS]", "a", "a"],  # duplicate
        ["[PAD]", "[UNK]", "[CLS]", "Red"],  # not producible by `words`
    ],
)
def test_bad_vocab(vocab):
    with pytest.raises(ValueError):
        Tokenizer(vocab, max_length=8)


def test_bad_max_length():
    with pytest.raises(ValueError):
        Tokenizer(Tokenizer.build_vocab(["a"]), max_length=0)


def test_non_str_input(tokenizer):
    with pytest.raises(TypeError):
        tokenizer(3)
    with pytest.raises(TypeError):
        tokenizer(["a red circle", None])
    with pytest.raises(TypeError):
        tokenizer.encode(["a red circle"])


# ----------------------------------------------------------------------------- attention


def attention_inputs(seed: int = 0):
    """q, k, v of shape (B=2, nh=3, T=5, hs=4) in float64 and a (B, T) key-padding mask."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    key_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])  # (B, T)
    return q, k, v, key_mask


def test_attention_matches_torch_reference():
    q, k, v, key_mask = attention_inputs()
    mask = key_mask[:, None, None, :]  # (B, 1, 1, T)
    ours = scaled_dot_product_attention(q, k, v, mask)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
    unmasked = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v), unmasked, atol=1e-6, rtol=0)


def test_attention_matches_explicit_loop():
    q, k, v, key_mask = attention_inputs()
    B, nh, T, hs = q.shape
    expected = torch.zeros_like(v)
    for b in range(B):
        keys = [j for j in range(T) if key_mask[b, j]]
        for h in range(nh):
            for i in range(T):
                scores = [float(q[b, h, i] @ k[b, h, j]) / math.sqrt(hs) for j in keys]
                top = max(scores)
                exps = [math.exp(s - top) for s in scores]
                total = sum(exps)
                for weight, j in zip(exps, keys):
                    expected[b, h, i] += weight / total * v[b, h, j]
    ours = scaled_dot_product_attention(q, k, v, key_mask[:, None, None, :])
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    # and with einsum, no mask
    weights = torch.einsum("bhid,bhjd->bhij", q, k).div(math.sqrt(hs)).softmax(-1)
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v), torch.einsum("bhij,bhjd->bhid", weights, v), atol=1e-6, rtol=0
    )


def test_masked_keys_get_zero_weight():
    q, k, v, key_mask = attention_inputs()
    mask = key_mask[:, None, None, :]
    out = scaled_dot_product_attention(q, k, v, mask)
    v_changed, k_changed = v.clone(), k.clone()
    v_changed[1, :, 3:] = 1e6  # masked positions of sequence 1
    k_changed[1, :, 3:] = -1e6
    assert torch.equal(scaled_dot_product_attention(q, k_changed, v_changed, mask), out)
    assert not torch.isnan(out).any()
    # identity v reads off the attention weights: masked columns are exactly 0
    eye = torch.eye(5, dtype=torch.float64).expand(2, 3, 5, 5)
    weights = scaled_dot_product_attention(q, k, eye, mask)  # (B, nh, T, T)
    assert torch.all(weights[1, :, :, 3:] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64))


def test_mhsa_one_head_identity_projections_is_the_function():
    dim, T = 6, 5
    attn = MultiHeadSelfAttention(dim, heads=1).double()
    with torch.no_grad():
        attn.qkv.weight.copy_(torch.eye(dim).repeat(3, 1))  # W^Q = W^K = W^V = I
        attn.qkv.bias.zero_()
        attn.proj.weight.copy_(torch.eye(dim))  # W^O = I
        attn.proj.bias.zero_()
    x = torch.randn(2, T, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    key_mask = torch.tensor([[True] * T, [True, True, False, False, False]])
    expected = scaled_dot_product_attention(x, x, x, key_mask[:, None, :])  # (B, T, C)
    torch.testing.assert_close(attn(x, key_mask), expected, atol=1e-12, rtol=0)


def test_mhsa_rejects_indivisible_heads():
    with pytest.raises(ValueError):
        MultiHeadSelfAttention(10, heads=3)


# ----------------------------------------------------------------------------- encoder


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        TextEncoderConfig(dim=30, heads=4)
    for field in ("dim", "depth", "heads", "max_length", "mlp_ratio"):
        with pytest.raises(ValueError, match=field):
            TextEncoderConfig(**{field: 0})
    with pytest.raises(ValueError):
        TextEncoderConfig(dropout=1.0)


def test_default_parameter_count():
    # emb 60*128 + pos 24*128 + 2 blocks * 198272 + ln_f 256
    assert TextEncoder(TextEncoderConfig(), vocab_size=60).num_parameters() == 407_552


def test_output_shapes(tokenizer):
    encoder = tiny_encoder(tokenizer.vocab_size)
    out = encode_prompts(tokenizer, encoder, ["a red circle", "", "green triangle"])
    assert isinstance(out, TextEncoding)
    assert out.tokens.shape == (3, 4, 32)
    assert out.mask.shape == (3, 4) and out.mask.dtype == torch.bool
    assert out.pooled.shape == (3, 32)
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()


def test_padding_invariance(tokenizer):
    tokenizer = Tokenizer(tokenizer.vocab, max_length=24)
    encoder = tiny_encoder(tokenizer.vocab_size)
    with torch.no_grad():
        alone = encode_prompts(tokenizer, encoder, ["a red circle"])
        batch = encode_prompts(tokenizer, encoder, ["a red circle", LONG_PROMPT])
    assert batch.tokens.shape[1] > alone.tokens.shape[1]
    n = alone.tokens.shape[1]
    torch.testing.assert_close(batch.tokens[0, :n], alone.tokens[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.pooled[0], alone.pooled[0], atol=1e-5, rtol=0)


def test_padding_content_has_no_influence(tokenizer):
    encoder = tiny_encoder(tokenizer.vocab_size)
    ids, mask = tokenizer(["a red circle", "a big blue square bottom right"])
    other = ids.clone()
    other[0, 4:] = torch.tensor([5, 6, 7])  # garbage ids in sequence 0's padding
    with torch.no_grad():
        out, out_other = encoder(ids, mask), encoder(other, mask)
    torch.testing.assert_close(out.tokens[0, :4], out_other.tokens[0, :4], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.pooled, out_other.pooled, atol=1e-6, rtol=0)
    # pooled is exactly the masked mean of the real token states
    torch.testing.assert_close(out.pooled[0], out.tokens[0, :4].mean(0), atol=1e-6, rtol=0)


def test_output_depends_on_words(tokenizer):
    encoder = tiny_encoder(tokenizer.vocab_size)
    with torch.no_grad():
        out = encode_prompts(tokenizer, encoder, ["a red circle", "a blue circle", "circle red a", ""])
    pooled = out.pooled
    for i in range(4):
        for j in range(i + 1, 4):
            assert (pooled[i] - pooled[j]).abs().max() > 1e-3, (i, j)


def test_gradients_reach_embeddings(tokenizer):
    encoder = tiny_encoder(tokenizer.vocab_size).train()
    out = encode_prompts(tokenizer, encoder, ["a red circle", "green triangle"])
    (out.pooled.square().sum() + out.tokens.square().sum()).backward()
    assert encoder.tok_emb.weight.grad.abs().sum() > 0
    assert encoder.pos_emb.weight.grad.abs().sum() > 0
    used = tokenizer("a red circle").ids[0]
    assert (encoder.tok_emb.weight.grad[used].abs().sum(-1) > 0).all()
    unused = tokenizer.token_to_id["square"]
    assert encoder.tok_emb.weight.grad[unused].abs().sum() == 0


def test_empty_prompt_encodes(tokenizer):
    encoder = tiny_encoder(tokenizer.vocab_size)
    out = encode_prompts(tokenizer, encoder, "")
    assert out.tokens.shape == (1, 1, 32)
    torch.testing.assert_close(out.pooled[0], out.tokens[0, 0])


def test_seeded_init_is_deterministic(tokenizer):
    first, second = tiny_encoder(tokenizer.vocab_size, seed=3), tiny_encoder(tokenizer.vocab_size, seed=3)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    ids, mask = tokenizer(["a red circle"])
    assert torch.equal(first(ids, mask).pooled, second(ids, mask).pooled)
    third = tiny_encoder(tokenizer.vocab_size, seed=4)
    assert not torch.equal(first.tok_emb.weight, third.tok_emb.weight)


def test_too_long_sequence_rejected():
    encoder = tiny_encoder(10, max_length=4)
    ids = torch.full((1, 5), Tokenizer.CLS_ID)
    with pytest.raises(ValueError, match="max_length"):
        encoder(ids, torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError):
        encode_prompts(Tokenizer(Tokenizer.build_vocab(["a b c d e f g"]), max_length=8), encoder, "a")
