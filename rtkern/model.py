"""Llama-family decoder (Llama 2/3, SmolLM2): one plain PyTorch module for training and inference.

Parameter names follow Hugging Face's LlamaForCausalLM without the ``model.`` prefix, so converting a
checkpoint is a key rename (``hf_to_rtkern_state_dict`` / ``rtkern_to_hf_state_dict``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    head_dim: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # llama.cpp stores llama3-style scaling as per-frequency divisors (GGUF tensor rope_freqs.weight)
    rope_freq_factors: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind in (None, "default"):
                self.rope_scaling = None
            elif kind != "llama3":
                raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: 'llama3')")
            else:
                missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                                       "original_max_position_embeddings") if k not in self.rope_scaling]
                if missing:
                    raise ValueError(f"rope_scaling (llama3) is missing {missing}")

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Build from a Hugging Face ``config.json`` dict of a LlamaForCausalLM."""
        model_type = cfg.get("model_type")
        if model_type != "llama":
            raise ValueError(f"unsupported model_type {model_type!r} (supported: 'llama')")
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        if any(a != "LlamaForCausalLM" for a in archs):
            raise ValueError(f"unsupported architectures {archs!r} (supported: ['LlamaForCausalLM'])")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} (supported: 'silu')")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ValueError(f"unsupported {flag}=True (biases are not implemented)")
        if cfg.get("pretraining_tp", 1) not in (1, None):
            raise ValueError(f"unsupported pretraining_tp={cfg['pretraining_tp']}")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                    "intermediate_size"):
            if key not in cfg:
                raise ValueError(f"config is missing required field {key!r}")
        if cfg.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
            raise ValueError(f"unsupported partial_rotary_factor={cfg['partial_rotary_factor']} (rotary over the "
                             "whole head only)")
        # transformers>=5 writes `rope_parameters` (theta inside); older configs use rope_theta + rope_scaling.
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
        _check_rope_spellings_agree(cfg)
        theta = cfg.get("rope_theta")
        if rope is not None:
            rope = dict(rope)
            theta = rope.pop("rope_theta", theta)
            if rope.get("rope_type", rope.get("type")) in (None, "default"):
                rope = None
        return cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta if theta is not None else 10000.0),
            rope_scaling=rope,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            head_dim=cfg.get("head_dim"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )

    def to_hf_config(self) -> dict:
        """A transformers ``config.json`` dict; GGUF frequency factors become the llama3 scaling they encode."""
        scaling = self.rope_scaling if self.rope_freq_factors is None else _llama3_scaling_of(self)
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if scaling is not None:
            rope = {**scaling, "rope_type": "llama3", "rope_theta": self.rope_theta}
            rope.pop("type", None)
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim, "vocab_size": self.vocab_size,
            "intermediate_size": self.intermediate_size, "rms_norm_eps": self.norm_eps,
            # both spellings, so transformers 4.x and 5.x read the same rope
            "rope_theta": self.rope_theta, "rope_scaling": None if scaling is None else dict(scaling),
            "rope_parameters": rope,  # copies: transformers' LlamaConfig writes into the dicts it is given
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False, "mlp_bias": False,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
        }

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        key = name.lower().replace("_", "-")
        if key not in _CONFIGS:
            raise ValueError(f"unknown model name {name!r}; known: {sorted(_CONFIGS)}")
        return cls(**_CONFIGS[key])


_SMOLLM2_135M = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                     intermediate_size=1536, norm_eps=1e-5, rope_theta=100000.0,
                     tie_word_embeddings=True, max_position_embeddings=8192)
_LLAMA3_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                  intermediate_size=14336, norm_eps=1e-5, rope_theta=500000.0,
                  max_position_embeddings=8192)
_CONFIGS = {
    "smollm2-135m": _SMOLLM2_135M,
    "smollm2-135m-instruct": _SMOLLM2_135M,
    "smollm2-360m": dict(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, vocab_size=49152,
                         intermediate_size=2560, norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, intermediate_size=11008,
                      norm_eps=1e-5, max_position_embeddings=4096),
    "llama3-8b": _LLAMA3_8B,
    "llama3.1-8b": {**_LLAMA3_8B, "max_position_embeddings": 131072,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                        intermediate_size=8192, norm_eps=1e-5, rope_theta=500000.0,
                        tie_word_embeddings=True, max_position_embeddings=131072,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def _check_rope_spellings_agree(cfg: dict) -> None:
    # transformers 5 reads rope_scaling when both are there; a config whose two spellings differ is ambiguous
    a, b = cfg.get("rope_parameters"), cfg.get("rope_scaling")
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return
    kind = [d.get("rope_type", d.get("type", "default")) for d in (a, b)]
    same = kind[0] == kind[1] and all(a[k] == b[k] for k in a.keys() & b.keys() - {"rope_type", "type"})
    if not same:
        raise ValueError(f"rope_parameters {a} and rope_scaling {b} disagree; keep one")


def _llama3_scaling_of(args: ModelArgs) -> dict:
    """The llama3 ``rope_scaling`` whose frequencies equal a GGUF's ``rope_freq_factors`` (llama.cpp
    stores Llama-3.x scaling as per-frequency divisors; a Hugging Face config can only say llama3)."""
    target = rope_inv_freq(args)
    for factor in (8.0, 16.0, 32.0, 64.0):   # Llama 3.1 uses 8, Llama 3.2 32; the others share low/high/context
        s = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}
        if torch.allclose(rope_inv_freq(replace(args, rope_freq_factors=None, rope_scaling=s)), target,
                          rtol=1e-5, atol=0):
            return s
    raise ValueError("the GGUF's rope frequency factors match no llama3 rope_scaling (factor 8, 16, 32 or 64 "
                     "with low 1, high 4, original context 8192): a Hugging Face config cannot express them")


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in float32, with llama3 scaling when configured."""
    hd = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device="cpu").float() / hd))
    if args.rope_freq_factors is not None:
        if len(args.rope_freq_factors) != hd // 2:
            raise ValueError(f"rope_freq_factors has {len(args.rope_freq_factors)} entries, expected {hd // 2}")
        inv = inv / torch.tensor(args.rope_freq_factors, dtype=torch.float32, device="cpu")
    s = args.rope_scaling
    if s is None:
        return inv
    factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # half-split ("rotate_half") layout, as in Hugging Face Llama checkpoints
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache(nn.Module):
    def __init__(self, max_batch: int, max_seq: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v: [B, H, T, D]; input_pos: [T] or [B, T]. Returns the cache views for the first B rows."""
        B = k.shape[0]
        kc, vc = self.k_cache[:B], self.v_cache[:B]
        if input_pos.dim() == 1:
            kc[:, :, input_pos] = k
            vc[:, :, input_pos] = v
        else:
            rows = torch.arange(B, device=k.device)[:, None]
            kc[rows, :, input_pos] = k.transpose(1, 2)
            vc[rows, :, input_pos] = v.transpose(1, 2)
        return kc, vc


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, input_pos, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            kc, vc = self.kv_cache.update(input_pos, k, v)
            if mask is not None:  # else a prefill from position 0: the new tokens are all there is to see
                k, v = kc, vc
        y = _decode_attention(q, k, v, mask) if T == 1 and mask is not None else _sdpa(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def _decode_attention(q, k, v, mask):
    """One query per row over the masked cache; GQA by grouping query heads, never repeating k/v.

    Plain matmuls beat SDPA here: its CPU flash kernel takes ~9 ms per layer for one query with a mask.
    """
    B, H, _, D = q.shape
    qg = q.view(B, k.shape[1], H // k.shape[1], D)
    s = torch.matmul(qg, k.transpose(-1, -2)).float() * D ** -0.5        # [B, Hkv, rep, S]
    s = s.masked_fill(~mask.view(mask.shape[0], 1, 1, -1), float("-inf"))
    return torch.matmul(torch.softmax(s, -1).to(v.dtype), v).view(B, H, 1, D)


def _sdpa(q, k, v, mask):
    causal = mask is None
    if q.shape[1] != k.shape[1]:
        if causal:  # flash attention groups the query heads itself
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        # With a mask (packed rows, padded prefill) only the math backend takes enable_gqa, and it stores
        # fp32 [B, H, T, T] scores; repeated k/v keep the memory-efficient kernel.
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, input_pos, mask):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights_()
        # Not a buffer: model.to(bfloat16) must not round the frequencies.
        self._inv_freq_cpu = rope_inv_freq(args)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self.max_batch = self.max_seq = 0

    def tie_weights_(self) -> "Transformer":
        """Share the embedding matrix with the head when the config ties them."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        return self

    def to_empty(self, *, device, recurse: bool = True) -> "Transformer":
        # nn.Module.to_empty makes a new tensor per module, so a tied matrix would come back as two copies.
        return super().to_empty(device=device, recurse=recurse).tie_weights_()

    def setup_cache(self, max_batch: int, max_seq: int, dtype=None, device=None):
        p = self.embed_tokens.weight
        dtype, device = dtype or p.dtype, device or p.device
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(max_batch, max_seq, self.args.n_kv_heads,
                                               self.args.head_dim, dtype, device)
        self.max_batch, self.max_seq = max_batch, max_seq
        self.inv_freq(torch.device(device))  # materialise before any CUDA-graph capture

    def remove_cache(self):
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.max_batch = self.max_seq = 0

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        t = self._inv_freq.get(device)
        if t is None:
            t = self._inv_freq[device] = self._inv_freq_cpu.to(device)
        return t

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                logits_index: torch.Tensor | None = None, *, attn_mask: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] (or [B, V] at ``logits_index`` [B] int64, one position per row).

        With a cache (``setup_cache``), k/v are written at ``input_pos`` ([T] or [B, T]) and each query
        attends to cache slots <= its position; ``input_pos=None`` starts the sequences: k/v go to slots
        0..T-1 and attention is causal over ``tokens`` alone (a prefill). Without a cache, plain causal
        attention over ``tokens`` (training). ``logits_index`` skips the head on the other positions
        (prefill only needs each prompt's last token).

        Training extras (no cache): ``attn_mask`` [B, T, T] bool (True = may attend) replaces the causal
        mask, e.g. block-diagonal for packed sequences with per-sequence ``input_pos`` [B, T];
        ``return_hidden`` returns the final-norm hidden states [B, T, D] instead of logits (for a
        chunked loss that never builds [B, T, V]).
        """
        B, T = tokens.shape
        device = tokens.device
        cached = self.max_seq > 0
        fresh = input_pos is None
        if fresh:
            input_pos = torch.arange(T, device=device)
        if cached and B > self.max_batch:
            raise ValueError(f"batch {B} exceeds the cache's max_batch {self.max_batch}")
        # Positions are device tensors (checking their values would sync): only the shape is checked here;
        # the engine keeps every position below max_seq.
        if cached and T > self.max_seq:
            raise ValueError(f"{T} tokens exceed the cache's max_seq {self.max_seq}")
        freqs = input_pos.float()[..., None] * self.inv_freq(device)     # [T, D/2] or [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        x = self.embed_tokens(tokens)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        # broadcast against [B, H, T, D]
        cos, sin = (cos[None, None], sin[None, None]) if input_pos.dim() == 1 else (cos[:, None], sin[:, None])
        mask = None
        if attn_mask is not None:
            if cached:
                raise ValueError("attn_mask is for training without a KV cache")
            mask = attn_mask[:, None]
        if cached and not fresh:
            slots = torch.arange(self.max_seq, device=device)
            mask = slots <= input_pos[..., None]                          # [T, S] or [B, T, S]
            mask = mask[None, None] if input_pos.dim() == 1 else mask[:, None]
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask)
        if logits_index is not None:
            x = x[torch.arange(B, device=device), logits_index]
        if return_hidden:
            return self.norm(x)
        return self.lm_head(self.norm(x))


def right_padded(rows: list[list[int]], batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU int64 ``tokens [batch, length]`` (token lists right-padded with id 0, then pad rows) and each
    row's last real position ``[batch]`` (0 on pad rows): `Transformer.forward`'s ``logits_index``.

    Under causal attention pads after every real token never change a real position's logits.
    """
    tokens = torch.zeros(batch, length, dtype=torch.int64)
    last = torch.zeros(batch, dtype=torch.int64)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = torch.tensor(r, dtype=torch.int64)
        last[b] = len(r) - 1
    return tokens, last


def hf_to_rtkern_state_dict(sd: dict) -> dict:
    """Hugging Face LlamaForCausalLM keys -> ours (drop the ``model.`` prefix and rotary buffers)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("rotary_emb.inv_freq"):
            continue
        out[k[len("model."):] if k.startswith("model.") else k] = v
    return out


def rtkern_to_hf_state_dict(sd: dict, tie_word_embeddings: bool | None = None) -> dict:
    """Our keys -> Hugging Face's. A tied ``lm_head.weight`` is dropped (HF re-ties it on load)."""
    if tie_word_embeddings is None:
        lm, emb = sd.get("lm_head.weight"), sd.get("embed_tokens.weight")
        tie_word_embeddings = lm is not None and emb is not None and lm.data_ptr() == emb.data_ptr()
    out = {}
    for k, v in sd.items():
        if k == "lm_head.weight":
            if not tie_word_embeddings:
                out[k] = v
        else:
            out["model." + k] = v
    return out
