"""rtkern.model against transformers' LlamaForCausalLM on tiny random configs (CPU, fp32)."""
import pytest
import torch

from rtkern.loader import build_model, load_hf_state_dict
from rtkern.model import (ModelArgs, Transformer, hf_to_rtkern_state_dict, rope_inv_freq,
                          rtkern_to_hf_state_dict)

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CONFIGS = {
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-llama3-rope": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                            rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
}
ATOL = 1e-4


def hf_model(name, seed=0, vocab=101):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=96, vocab_size=vocab,
                                   max_position_embeddings=128, rms_norm_eps=1e-5, **CONFIGS[name])
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # default init leaves norms at 1; randomise so they are exercised
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its saved safetensors directory)."""
    hf = hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    args, sd = load_hf_state_dict(d)
    return hf, build_model(args, sd, device="cpu", dtype=torch.float32, source=str(d))


def test_prefill_matches_hf(pair):
    hf, ours = pair
    tokens = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=ATOL, rtol=0)


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
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(got, full, atol=2e-5, rtol=0)


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


def test_training_backward_and_tied_grads():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, intermediate_size=48,
                     tie_word_embeddings=True)
    torch.manual_seed(0)
    m = Transformer(args)
    assert m.lm_head.weight is m.embed_tokens.weight
    x = torch.randint(0, 50, (3, 10))
    loss = torch.nn.functional.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_state_dict_names_roundtrip(pair):
    hf, ours = pair
    hf_sd = rtkern_to_hf_state_dict(ours.state_dict())
    tied = hf.config.tie_word_embeddings
    assert ("lm_head.weight" in hf_sd) != tied
    assert set(hf_sd) == {k for k in hf.state_dict() if not (tied and k == "lm_head.weight")}
    back = hf_to_rtkern_state_dict(hf.state_dict())
    assert set(back) == set(ours.state_dict())


def test_bf16_cast_keeps_fp32_rope():
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=20, intermediate_size=32, rope_theta=500000.0)
    m = Transformer(args).to(torch.bfloat16)
    assert m.inv_freq(torch.device("cpu")).dtype == torch.float32
    m.setup_cache(1, 8)
    assert m(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def test_from_hf_config_rejects_unsupported():
    base = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4).to_dict()
    with pytest.raises(ValueError, match="model_type"):
        ModelArgs.from_hf_config({**base, "model_type": "mistral"})
    with pytest.raises(ValueError, match="hidden_act"):
        ModelArgs.from_hf_config({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="attention_bias"):
        ModelArgs.from_hf_config({**base, "attention_bias": True})
    with pytest.raises(ValueError, match="yarn"):
        ModelArgs.from_hf_config({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="hidden_size"):
        ModelArgs.from_hf_config({k: v for k, v in base.items() if k != "hidden_size"})


def test_from_name():
    a = ModelArgs.from_name("smollm2-135m")
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.tie_word_embeddings) == (576, 30, 9, 3, True)
    b = ModelArgs.from_name("llama3-8b")
    assert (b.dim, b.n_kv_heads, b.vocab_size, b.head_dim) == (4096, 8, 128256, 128)
    with pytest.raises(ValueError, match="unknown model name"):
        ModelArgs.from_name("gpt-5")
