"""``cuflash.torch.transformers_attention``: the mask logic on its own (needs only torch), and a
tiny Llama from transformers run through it beside transformers' eager and SDPA attention (skipped
without transformers, which CI does not install).

CPU float32 throughout: cuflash's NumPy backend against PyTorch's float32 math, so results agree
to float32 rounding.
"""

import pytest

torch = pytest.importorskip("torch")
import cuflash.torch  # noqa: E402  (needs torch, which the skip above guarantees)

B, HQ, HKV, D = 2, 4, 2, 8


def _bhsd(seed, sq, sk, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, sq, D, generator=g)
    k, v = (torch.randn(B, HKV, sk, D, generator=g) for _ in range(2))
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def _sdpa(q, k, v, allowed):
    """transformers' SDPA path in float32: allowed (B, 1, Sq, Sk) boolean, or None for top-left causal."""
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, is_causal=allowed is None, enable_gqa=True).transpose(1, 2)


def _allowed(lengths, sq, sk, reach):
    """key j < lengths[b] and (reach None, or j <= i + reach), as a (B, 1, Sq, Sk) boolean mask."""
    j = torch.arange(sk)
    mask = j < torch.tensor(lengths)[:, None, None]
    if reach is not None:
        mask = mask & (j <= torch.arange(sq)[:, None] + reach)
    return mask.expand(-1, sq, sk)[:, None]


def _padding(lengths, s):
    return (torch.arange(s) < torch.tensor(lengths)[:, None]).long()


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


def test_no_mask_is_sdpa_causal():
    q, k, v = _bhsd(0, 9, 9)
    out, weights = cuflash.torch.transformers_attention(None, q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (B, 9, HQ, D)
    _close(out, torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=0.3, enable_gqa=True).transpose(1, 2))
    # One query row sees every key (decoding), as in transformers' SDPA path.
    q1 = q[:, :, -1:]
    out, _ = cuflash.torch.transformers_attention(None, q1, k, v, None)
    _close(out, _sdpa(q1, k, v, torch.ones(B, 1, 1, 9, dtype=torch.bool)))


@pytest.mark.parametrize("sq, sk, lengths, reach", [
    (9, 9, [9, 5], 0),        # right-padded training batch
    (9, 9, [9, 9], 0),        # no padding, mask given anyway: the dense call
    (9, 9, [6, 4], None),     # bidirectional with padding
    (3, 12, [12, 12], 9),     # three new queries against a cache of nine
    (3, 12, [10, 12], 7),     # ... of a static cache filled to ten in the first sequence
], ids=["padded", "unpadded", "bidirectional", "cache", "static-cache"])
def test_boolean_masks_match_sdpa(sq, sk, lengths, reach):
    q, k, v = _bhsd(1, sq, sk)
    allowed = _allowed(lengths, sq, sk, reach)
    out, _ = cuflash.torch.transformers_attention(None, q, k, v, allowed)
    _close(out, _sdpa(q, k, v, allowed))


@pytest.mark.parametrize("causal", [True, False])
def test_padding_mask_becomes_lengths(causal):
    q, k, v = _bhsd(2, 7, 7)
    out, _ = cuflash.torch.transformers_attention(None, q, k, v, _padding([7, 4], 7), is_causal=causal)
    _close(out, _sdpa(q, k, v, _allowed([7, 4], 7, 7, 0 if causal else None)))


def test_padded_gradients_match_sdpa():
    q, k, v = _bhsd(3, 8, 8, requires_grad=True)
    allowed = _allowed([8, 5], 8, 8, 0)
    dout = torch.randn(B, 8, HQ, D, generator=torch.Generator().manual_seed(4))
    ours = torch.autograd.grad(cuflash.torch.transformers_attention(None, q, k, v, allowed)[0], (q, k, v), dout)
    theirs = torch.autograd.grad(_sdpa(q, k, v, allowed), (q, k, v), dout)
    for a, b in zip(ours, theirs):
        _close(a, b)


def _window(sq, sk, size):
    i, j = torch.arange(sq)[:, None], torch.arange(sk)
    return ((j <= i) & (j > i - size)).expand(B, 1, sq, sk)


def _refusals():
    left = _padding([6, 4], 6).flip(1)
    left_causal = _allowed([6, 6], 6, 6, 0) & left.bool()[:, None, None, :]
    packed = _allowed([6, 6], 6, 6, 0).clone()
    packed[:, :, 3:, :3] = False  # two sequences of three in each row
    heads = _allowed([6, 6], 6, 6, 0).expand(B, HQ, 6, 6).clone()
    heads[:, 1] = True
    additive = torch.zeros(B, 1, 6, 6).masked_fill(~_allowed([6, 4], 6, 6, 0), float("-inf"))
    return [
        (dict(attention_mask=left), "left padding"),
        (dict(attention_mask=left_causal), "left padding"),
        (dict(attention_mask=packed), "packed"),
        (dict(attention_mask=_window(6, 6, 2)), "sliding window"),
        (dict(attention_mask=heads), "per-head"),
        (dict(attention_mask=additive), "boolean masks"),
        (dict(attention_mask=torch.ones(B, 6, 6, dtype=torch.bool)), "3 dimensions"),
        (dict(attention_mask=torch.ones(B, 5, dtype=torch.bool)), "padding mask"),
        (dict(attention_mask=_allowed([6, 6], 6, 6, 0), k_rows=5), "not \\(B, H, Sq, Sk\\)"),
        (dict(attention_mask=_padding([6, 6], 6), q_rows=2), "Sq = 2 differs"),
        (dict(attention_mask=None, dropout=0.1), "dropout"),
        (dict(attention_mask=None, output_attentions=True), "attention weights"),
        (dict(attention_mask=None, position_bias=torch.zeros(1, HQ, 6, 6)), "position_bias"),
    ]


@pytest.mark.parametrize("case, message", _refusals(), ids=lambda x: x if isinstance(x, str) else "")
def test_inexact_masks_and_options_are_refused(case, message):
    case = dict(case)
    q, k, v = _bhsd(5, case.pop("q_rows", 6), case.pop("k_rows", 6))
    with pytest.raises(ValueError, match=message):
        cuflash.torch.transformers_attention(None, q, k, v, **case)


# --- transformers ---------------------------------------------------------------------------------

NAME = "cuattention_test"  # without "flash": transformers takes such names for its own FlashAttention


@pytest.fixture(scope="module")
def llama():
    transformers = pytest.importorskip("transformers")
    from transformers.masking_utils import sdpa_mask

    transformers.AttentionInterface.register(NAME, cuflash.torch.transformers_attention)
    transformers.AttentionMaskInterface.register(NAME, sdpa_mask)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


def _logits(model, implementation, ids, **inputs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(ids, **inputs).logits


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "right-padded"])
def test_llama_logits_match_eager_and_sdpa(llama, padded):
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    inputs = dict(attention_mask=_padding([16, 11], 16)) if padded else {}
    ours = _logits(llama, NAME, ids, **inputs)
    for reference in ("eager", "sdpa"):
        torch.testing.assert_close(ours, _logits(llama, reference, ids, **inputs), rtol=1e-5, atol=1e-5)


def test_llama_gradients_match_sdpa(llama):
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    grads = {}
    for implementation in (NAME, "sdpa"):
        llama.set_attn_implementation(implementation)
        llama.zero_grad()
        llama(ids, attention_mask=_padding([12, 9], 12), labels=ids).loss.backward()
        grads[implementation] = llama.model.layers[0].self_attn.q_proj.weight.grad.clone()
    llama.zero_grad()
    torch.testing.assert_close(grads[NAME], grads["sdpa"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("inputs, message", [
    (dict(attention_mask=_padding([16, 11], 16).flip(1)), "left padding"),
    # transformers finds packed sequences from the positions when there is no cache.
    (dict(position_ids=torch.tensor([list(range(8)) * 2] * 2), use_cache=False), "packed"),
], ids=["left-padded", "packed"])
def test_llama_refuses_masks_it_cannot_apply(llama, inputs, message):
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match=message):
        _logits(llama, NAME, ids, **inputs)


def test_llama_without_the_mask_function_is_refused(llama):
    import transformers

    transformers.AttentionInterface.register("cuattention_nomask", cuflash.torch.transformers_attention)
    with pytest.raises(ValueError, match="sdpa_mask"):
        _logits(llama, "cuattention_nomask", torch.zeros(1, 4, dtype=torch.long))
