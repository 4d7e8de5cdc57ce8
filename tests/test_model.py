"""rtkern.model against transformers' LlamaForCausalLM on tiny random configs (CPU, fp32)."""
import copy
import dataclasses

import pytest
import torch

from rtkern.loader import build_model, load_hf_state_dict
from rtkern.model import (ModelArgs, Transformer, hf_to_rtkern_state_dict, rope_inv_freq,
                          rtkern_to_hf_state_dict)

transformers = pytest.importorskip("transformers")
from tiny import randomize_norms_  # noqa: E402  (tests/ is on sys.path under pytest)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CONFIGS = {
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-llama3-rope": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                            rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
}
# fp32, same weights: the observed gap to transformers is <= 3e-6 on logits of magnitude ~4.
ATOL, RTOL = 1e-5, 1e-5


def hf_model(name, seed=0, vocab=101):
    # initializer_range 0.1 (not the default 0.02): with near-zero q/k the attention is almost uniform and a
    # 1% error in rope_theta moved the logits by only 3e-5; here it moves them by > 5e-4 (checked below).
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=96, vocab_size=vocab,
                                   max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.1,
                                   **copy.deepcopy(CONFIGS[name]))  # LlamaConfig writes into rope dicts
    return randomize_norms_(transformers.LlamaForCausalLM(cfg).eval())


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its saved safetensors directory)."""
    hf = hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    args, sd = load_hf_state_dict(d)
    return hf, build_model(args, sd, device="cpu", dtype=torch.float32, source=str(d))


def _weights(ours):
    """``ours``'s state dict as a checkpoint holds it (a tied head is not stored twice)."""
    tied = ours.args.tie_word_embeddings
    return {k: v for k, v in ours.state_dict().items() if not (tied and k == "lm_head.weight")}


def _rebuilt(ours, **changes):
    """``ours`` with the same weights and some ModelArgs fields changed."""
    return build_model(dataclasses.replace(ours.args, **changes), _weights(ours), device="cpu", dtype=torch.float32)


def test_prefill_matches_hf(pair):
    hf, ours = pair
    tokens = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        torch.testing.assert_close(ours(tokens), ref, atol=ATOL, rtol=RTOL)
        # The comparison sees RoPE: a 1% error in theta (and, for llama3, dropping the scaling) fails it.
        wrong = [_rebuilt(ours, rope_theta=ours.args.rope_theta * 1.01)]
        if ours.args.rope_scaling is not None:
            wrong.append(_rebuilt(ours, rope_scaling=None))
        for m in wrong:
            assert (m(tokens) - ref).abs().max() > 20 * ATOL


def test_cached_decode_matches_hf_and_full_recompute(pair):
    hf, ours = pair
    B, P, steps = 2, 8, 32
    seq = torch.randint(0, 101, (B, P + steps), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(seq).logits
        full = ours(seq)
        ours.setup_cache(B, 64, torch.float32, "cpu")
        try:
            got = [ours(seq[:, :P], torch.arange(P))]
            for p in range(P, P + steps):
                pos = torch.full((B, 1), p) if p % 2 else torch.tensor([p])  # both input_pos forms
                got.append(ours(seq[:, p:p + 1], pos))
        finally:
            ours.remove_cache()
    got = torch.cat(got, dim=1)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got, full, atol=ATOL, rtol=RTOL)


def test_greedy_generation_matches_hf_generate(pair):
    hf, ours = pair
    prompt = torch.randint(0, 101, (1, 6), generator=torch.Generator().manual_seed(3))
    n = 8
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                          min_new_tokens=n)[0, prompt.shape[1]:].tolist()
        ours.setup_cache(1, 32)
        try:
            logits = ours(prompt, torch.arange(prompt.shape[1]))
            out = []
            for i in range(n):
                tok = int(logits[0, -1].argmax())
                out.append(tok)
                logits = ours(torch.tensor([[tok]]), torch.tensor([prompt.shape[1] + i]))
        finally:
            ours.remove_cache()
    assert out == ref


def test_llama3_inv_freq_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, rope_theta=500000.0,
                                   rope_scaling={**LLAMA3_ROPE, "original_max_position_embeddings": 8192})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_inv_freq(ModelArgs.from_hf_config(cfg.to_dict()))
    torch.testing.assert_close(ours, ref.float(), atol=0, rtol=1e-6)
    assert not torch.allclose(ours, rope_inv_freq(ModelArgs(dim=256, n_heads=2, rope_theta=500000.0)))


@pytest.mark.parametrize("name", ["llama3.1-8b", "llama3.2-1b"])
def test_gguf_rope_factors_are_saved_as_the_llama3_scaling_they_encode(name):
    # llama.cpp keeps Llama-3.x scaling as per-frequency divisors; a checkpoint's config.json must say llama3
    args = ModelArgs.from_name(name)
    plain = rope_inv_freq(dataclasses.replace(args, rope_scaling=None))
    factors = tuple((plain / rope_inv_freq(args)).tolist())
    gguf = dataclasses.replace(args, rope_scaling=None, rope_freq_factors=factors)
    back = ModelArgs.from_hf_config(gguf.to_hf_config())
    assert back.rope_scaling["factor"] == args.rope_scaling["factor"]
    torch.testing.assert_close(rope_inv_freq(back), rope_inv_freq(args), atol=0, rtol=1e-6)
    odd = dataclasses.replace(gguf, rope_freq_factors=tuple(f * 1.5 for f in factors))
    with pytest.raises(ValueError, match="match no llama3 rope_scaling"):
        odd.to_hf_config()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_backward_matches_hf_grads(name):
    hf = hf_model(name).train()
    ours = Transformer(ModelArgs.from_hf_config(hf.config.to_dict()))
    ours.load_state_dict(hf_to_rtkern_state_dict(hf.state_dict()), strict=False)
    tied = hf.config.tie_word_embeddings
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tied
    x = torch.randint(0, 101, (3, 10), generator=torch.Generator().manual_seed(4))

    def ce(logits):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())

    loss = ce(ours(x[:, :-1]))
    ref_loss = ce(hf(x[:, :-1]).logits)
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=RTOL)
    ref_grads = {k: p.grad for k, p in hf_to_rtkern_state_dict(dict(hf.named_parameters())).items()}
    got = dict(ours.named_parameters())  # a tied lm_head is listed once, as embed_tokens.weight
    assert set(got) == set(ref_grads) - ({"lm_head.weight"} if tied else set())
    for k, p in got.items():
        # a tied embedding's grad sums the input and output uses; losing either fails here
        scale = float(ref_grads[k].abs().max())
        assert scale > 0, k
        torch.testing.assert_close(p.grad, ref_grads[k], atol=1e-6 * scale, rtol=1e-5, msg=k)


def test_state_dict_names_roundtrip(pair):
    hf, ours = pair
    hf_sd = rtkern_to_hf_state_dict(ours.state_dict())
    tied = hf.config.tie_word_embeddings
    assert ("lm_head.weight" in hf_sd) != tied
    assert set(hf_sd) == {k for k in hf.state_dict() if not (tied and k == "lm_head.weight")}
    for k, v in hf_sd.items():  # ours was loaded from hf's saved files: the values must be hf's, bit for bit
        assert torch.equal(v, hf.state_dict()[k]), k
    back = hf_to_rtkern_state_dict(hf.state_dict())
    assert set(back) == set(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(back[k], v), k


def test_bf16_cast_keeps_fp32_rope():
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=20, intermediate_size=32, rope_theta=500000.0)
    m = Transformer(args).to(torch.bfloat16)
    inv = m.inv_freq(torch.device("cpu"))
    assert inv.dtype == torch.float32 and torch.equal(inv, rope_inv_freq(args))
    assert not torch.equal(inv.bfloat16().float(), inv)  # a bf16 round trip would change the values
    m.setup_cache(1, 8)
    assert m(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def test_bf16_logits_are_as_close_to_fp32_as_transformers_bf16(pair):
    # Both bf16 models against fp32 on the same bf16-rounded weights: ours may not round more than theirs.
    hf, ours = pair
    sd = _weights(ours)
    ours16 = build_model(ours.args, sd, device="cpu", dtype=torch.bfloat16)
    ref = build_model(ours.args, {k: v.bfloat16().float() for k, v in sd.items()}, device="cpu", dtype=torch.float32)
    hf16 = transformers.LlamaForCausalLM(hf.config).eval()
    hf16.load_state_dict(hf.state_dict())
    hf16.to(torch.bfloat16)
    tokens = torch.randint(0, 101, (2, 120), generator=torch.Generator().manual_seed(2))  # angles up to 120 rad
    with torch.no_grad():
        want = ref(tokens)
        err_ours = (ours16(tokens).float() - want).abs()
        err_hf = (hf16(tokens).logits.float() - want).abs()
    assert err_ours.max() <= 1.5 * err_hf.max() and err_ours.mean() <= 1.5 * err_hf.mean(), \
        (err_ours.max().item(), err_hf.max().item(), err_ours.mean().item(), err_hf.mean().item())


@pytest.mark.parametrize("change, match", [
    ({"model_type": "mistral"}, "unsupported model_type 'mistral'"),
    ({"architectures": ["LlamaForSequenceClassification"]}, r"unsupported architectures \['LlamaForSequence"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
    ({"attention_bias": True}, "unsupported attention_bias=True"),
    ({"mlp_bias": True}, "unsupported mlp_bias=True"),
    ({"pretraining_tp": 2}, "unsupported pretraining_tp=2"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope_scaling type 'yarn'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, r"llama3\) is missing \['low_freq_factor'"),
    ({"hidden_size": None}, "missing required field 'hidden_size'"),
    ({"num_key_value_heads": 3}, "n_heads=4 is not a multiple of n_kv_heads=3"),
    ({"head_dim": 15}, "head_dim=15 must be even"),
    ({"partial_rotary_factor": 0.5}, "unsupported partial_rotary_factor=0.5"),
    # transformers reads one spelling, we the other: refuse rather than guess
    ({"rope_scaling": {**LLAMA3_ROPE, "original_max_position_embeddings": 8192}}, "disagree; keep one"),
])
def test_from_hf_config_rejects_unsupported(change, match):
    base = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4).to_dict()
    ModelArgs.from_hf_config(base)  # the base itself is accepted: each case fails on its one change
    cfg = {k: v for k, v in {**base, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        ModelArgs.from_hf_config(cfg)


def test_from_name():
    a = ModelArgs.from_name("smollm2-135m")
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.tie_word_embeddings) == (576, 30, 9, 3, True)
    b = ModelArgs.from_name("llama3-8b")
    assert (b.dim, b.n_kv_heads, b.vocab_size, b.head_dim) == (4096, 8, 128256, 128)
    with pytest.raises(ValueError, match="unknown model name"):
        ModelArgs.from_name("gpt-5")


@pytest.mark.parametrize("tie", [True, False])
def test_to_empty_keeps_the_head_tied_as_configured(tie):
    # nn.Module.to_empty alone gives each module its own copy of a shared meta parameter
    with torch.device("meta"):
        model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=37, intermediate_size=48,
                                      tie_word_embeddings=tie))
    model = model.to_empty(device="cpu")
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    assert len(list(model.parameters())) == len(model.state_dict()) - tie


def test_from_hf_config_defaults_are_transformers_defaults():
    # a config.json may leave out any optional field: each absent one means what LlamaConfig means by it
    minimal = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=101,
                   intermediate_size=96)
    ours = ModelArgs.from_hf_config(minimal)
    full = transformers.LlamaConfig(**minimal).to_dict()
    assert ours == dataclasses.replace(ModelArgs.from_hf_config(full), bos_token_id=None, eos_token_id=None)
    assert (ours.norm_eps, ours.rope_theta, ours.max_position_embeddings) == (1e-6, 10000.0, 2048)
    assert (ours.n_kv_heads, ours.head_dim, ours.tie_word_embeddings, ours.rope_scaling) == (4, 16, False, None)


@pytest.mark.parametrize("rope_scaling", [None, LLAMA3_ROPE], ids=["default-rope", "llama3-rope"])
def test_hf_config_round_trip(rope_scaling):
    # every field away from its default, head_dim != dim / n_heads, an eos list
    args = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=101, intermediate_size=96,
                     norm_eps=1e-4, rope_theta=12345.0, rope_scaling=rope_scaling, tie_word_embeddings=True,
                     max_position_embeddings=333, head_dim=32, bos_token_id=5, eos_token_id=[6, 7])
    before = copy.deepcopy(args)
    cfg = args.to_hf_config()
    # both rope spellings say the same theta (transformers 4.x reads rope_theta, 5.x rope_parameters)
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 12345.0
    assert ModelArgs.from_hf_config(cfg) == args
    hf_cfg = transformers.LlamaConfig(**cfg).to_dict()  # as transformers re-saves it
    assert args == before  # LlamaConfig writes rope_theta into the rope dicts it gets: those must be copies
    assert ModelArgs.from_hf_config(hf_cfg) == args


def test_head_dim_other_than_dim_over_heads_matches_hf(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=32, intermediate_size=96, vocab_size=101, initializer_range=0.1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    args, sd = load_hf_state_dict(tmp_path)
    assert args.head_dim == 32
    ours = build_model(args, sd, device="cpu", dtype=torch.float32)
    tokens = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=ATOL, rtol=RTOL)


def _tiny_model():
    torch.manual_seed(0)
    return Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50,
                                 intermediate_size=48)).eval()


def test_logits_index_picks_one_position_per_row():
    m = _tiny_model()
    tokens = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(6))
    idx = torch.tensor([6, 2, 4])
    with torch.no_grad():
        full = m(tokens)
        want = full[torch.arange(3), idx]
        # Not bit-equal: BLAS may pick another kernel for 3 rows than for 21 (it does on some CPUs).
        torch.testing.assert_close(m(tokens, logits_index=idx), want, atol=1e-6, rtol=1e-6)
        m.setup_cache(3, 16)
        try:  # a cached prefill
            torch.testing.assert_close(m(tokens, torch.arange(7), logits_index=idx), want, atol=1e-6, rtol=1e-6)
        finally:
            m.remove_cache()


def test_cache_max_batch_enforced_and_remove_cache_restores_plain_forward():
    m = _tiny_model()
    tokens = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        plain = m(tokens)
        m.setup_cache(2, 16)
        assert (m.max_batch, m.max_seq) == (2, 16)
        with pytest.raises(ValueError, match="batch 3 exceeds the cache's max_batch 2"):
            m(tokens)
        with pytest.raises(ValueError, match="17 tokens exceed the cache's max_seq 16"):
            m(torch.zeros(1, 17, dtype=torch.long))
        torch.testing.assert_close(m(tokens[:2], torch.arange(5)), plain[:2], atol=1e-6, rtol=1e-6)
        m.remove_cache()
        assert (m.max_batch, m.max_seq) == (0, 0)
        assert all(layer.self_attn.kv_cache is None for layer in m.layers)
        # positions without a cache (training with explicit input_pos) is plain causal attention again
        torch.testing.assert_close(m(tokens, torch.arange(5)), plain, atol=0, rtol=0)


def test_hf_to_rtkern_drops_rotary_buffers():
    # older transformers saved rotary_emb.inv_freq in checkpoints; it is derived, not loaded
    sd = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8), "model.norm.weight": torch.ones(4),
          "lm_head.weight": torch.ones(2, 4)}
    assert list(hf_to_rtkern_state_dict(sd)) == ["norm.weight", "lm_head.weight"]


def test_rope_freq_factors_must_cover_half_the_head():
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=20, intermediate_size=32)
    with pytest.raises(ValueError, match="rope_freq_factors has 3 entries, expected 8"):
        rope_inv_freq(dataclasses.replace(args, rope_freq_factors=(1.0,) * 3))
    factors = tuple(float(i + 1) for i in range(8))
    torch.testing.assert_close(rope_inv_freq(dataclasses.replace(args, rope_freq_factors=factors)),
                               rope_inv_freq(args) / torch.tensor(factors), atol=0, rtol=1e-6)


# -- edges of the forward path (each test kills a surviving model.py mutation) --

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_rmsnorm_is_bit_equal_to_transformers(dtype, eps):
    # same op order as LlamaRMSNorm: float32 statistics, the input dtype before the weight multiply, the
    # configured epsilon (0.5 dominates mean(x^2) ~ 0.09 here, so an ignored or fixed epsilon shows)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from rtkern.model import RMSNorm
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(3, 5, 64, generator=g) * 0.3).to(dtype)
    w = torch.empty(64).uniform_(0.5, 1.5, generator=g)
    ours, ref = RMSNorm(64, eps), LlamaRMSNorm(64, eps=eps)
    with torch.no_grad():
        ours.weight.copy_(w)
        ref.weight.copy_(w)
        ours, ref = ours.to(dtype), ref.to(dtype)
        got, want = ours(x), ref(x)
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("edge", ["low", "high"])
def test_llama3_inv_freq_on_the_band_edges_matches_transformers(edge):
    # original_max_position_embeddings put exactly on one frequency's wavelength (low band edge: /low_freq_factor,
    # high: /high_freq_factor): the edges belong to the smoothed band, as in transformers
    import math
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    plain = ModelArgs(dim=256, n_heads=2, rope_theta=500000.0)
    wavelen = 2 * math.pi / rope_inv_freq(plain)
    old_ctx = float(wavelen[20]) * (1.0 if edge == "low" else 4.0)   # exact in float32 either way
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": old_ctx}
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, rope_theta=500000.0,
                                   rope_scaling=dict(scaling))
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_inv_freq(dataclasses.replace(plain, rope_scaling=scaling))
    torch.testing.assert_close(ours, ref.float(), atol=0, rtol=1e-6)


def test_one_token_sequences_match_hf(pair):
    # T == 1 without a cache (training) and as a fresh cached prefill takes the causal path, not the decode one
    hf, ours = pair
    tokens = torch.tensor([[7], [42]])
    with torch.no_grad():
        ref = hf(tokens).logits
        torch.testing.assert_close(ours(tokens), ref, atol=ATOL, rtol=RTOL)
        ours.setup_cache(2, 8, torch.float32, "cpu")
        try:
            torch.testing.assert_close(ours(tokens), ref, atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(ours(tokens[:, :1], torch.arange(1)), ref, atol=ATOL, rtol=RTOL)
        finally:
            ours.remove_cache()


def test_attn_mask_is_refused_with_a_cache():
    m = _tiny_model()
    tokens = torch.tensor([[1, 2, 3]])
    mask = torch.ones(1, 3, 3, dtype=torch.bool).tril()
    with torch.no_grad():
        torch.testing.assert_close(m(tokens, attn_mask=mask), m(tokens), atol=1e-6, rtol=1e-6)
        m.setup_cache(1, 8)
        try:
            with pytest.raises(ValueError, match="attn_mask is for training without a KV cache"):
                m(tokens, attn_mask=mask)
        finally:
            m.remove_cache()


def test_masked_gqa_attention_repeats_kv_instead_of_enable_gqa(monkeypatch):
    # On CUDA, enable_gqa with an attn_mask only runs on the math backend (fp32 [B, H, T, T] scores):
    # packed training rows and padded prefills repeat k/v; the causal (unmasked) path keeps enable_gqa.
    import torch.nn.functional as F
    from rtkern.model import _sdpa
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[1], kw.get("enable_gqa", False), kw.get("attn_mask") is not None))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 5, 8, generator=g) for h in (4, 2, 2))
    masked = _sdpa(q, k, v, torch.ones(5, 5, dtype=torch.bool).tril())
    causal = _sdpa(q, k, v, None)
    assert calls == [(4, 4, False, True), (4, 2, True, False)]
    torch.testing.assert_close(masked, causal)
