"""The decode step on Triton kernels: five to seven launches per layer instead of ~45.

``Transformer.forward`` stays the reference; this path computes the same step for one token per row:

1. RMSNorm, the q/k/v GEMM (one weight for all three), RoPE and the KV-cache write in one launch
   (``qkv_rope``) where its one-program-per-head grid suits the shape; else two (``fused_linear`` with the
   norm, then ``rope_cache_update``);
2. split-sequence decode attention: partial softmax per chunk;
3. the merge of the chunks, the output projection and the residual add in one launch
   (``attention_out_proj``) where the partials are small; else two (the merge, then ``fused_linear``);
4. RMSNorm fused into the gate/up GEMM, SwiGLU in its epilogue;
5. the down projection with the residual add in its epilogue.

At small batch a decoder step is launch-bound (SmolLM2 is 30 layers of ~1 µs kernels), so the number of
launches inside the CUDA graph is what this cuts: 5 per layer for SmolLM2 (7 for an 8B model, where
the GEMMs' weight reads dominate and the two one-launch variants would cost bandwidth), against 10 for
separate add+RMSNorm, RoPE, merge and SwiGLU kernels around cuBLAS GEMMs.
"""
from __future__ import annotations

import torch

from .kernels.attn_out_proj import attention_out_proj
from .kernels.decode_attention import decode_attention, decode_attention_partials
from .kernels.fused_linear import fused_linear
from .kernels.qkv_rope import qkv_rope
from .kernels.rope_cache import rope_cache_update, rope_table


# qkv_rope runs one program per head, each reading a [head_dim, dim] weight slice: beyond this size too few
# programs stream too much each to keep HBM busy (Llama-3-8B: 48 programs of 1 MB), and the two-launch
# path wins. SmolLM2's 74 KB slices are far below it.
QKV_ROPE_MAX_SLICE_BYTES = 256 * 1024
# attention_out_proj rebuilds its rows' attention output from the float32 chunk partials in every program:
# worth the saved launch while they stay small (SmolLM2 with at most 16 chunks: 38 KB per row), not for
# an 8B model (32 heads: 266 KB per row, re-read by each of ~500 programs).
MERGE_MAX_SPLITS = 16
MERGE_IN_O_PROJ_MAX_BYTES = 64 * 1024


def _fuse(first: torch.nn.Linear, *rest: torch.nn.Linear) -> torch.Tensor:
    """Concatenate the weights along the output dim and make the layers views into the result.

    Views, not copies: the state dict keeps its names and no memory is duplicated (1.6 GB of q/k/v for
    an 8B model), and ``load_state_dict`` into the layers updates the fused weight too.
    """
    layers = (first, *rest)
    fused = torch.cat([m.weight.detach() for m in layers])
    lo = 0
    for m in layers:
        n = m.weight.shape[0]
        m.weight.data = fused[lo:lo + n]
        lo += n
    return fused


def _is_fused(fused: torch.Tensor | None, *layers: torch.nn.Linear) -> bool:
    """Whether every layer's weight is still its slice of ``fused`` (a replaced parameter is not)."""
    if fused is None:
        return False
    at = fused.data_ptr()
    for m in layers:
        if m.weight.data_ptr() != at:
            return False
        at += m.weight.numel() * m.weight.element_size()
    return True


def prepare(model) -> bool:
    """Fuse q/k/v and gate/up weights (once) and build the RoPE table for the current KV cache.

    Call after ``model.setup_cache`` and before capturing a CUDA graph; cheap when nothing changed.
    Returns True when it replaced a tensor that a captured graph may hold.
    """
    # outside inference mode: the fused weights become the parameters' storage, which must stay trainable
    with torch.inference_mode(False), torch.no_grad():
        return _prepare(model)


def _prepare(model) -> bool:
    changed = False
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not _is_fused(getattr(attn, "wqkv", None), attn.q_proj, attn.k_proj, attn.v_proj):
            attn.wqkv, changed = _fuse(attn.q_proj, attn.k_proj, attn.v_proj), True
        if not _is_fused(getattr(mlp, "w_gate_up", None), mlp.gate_proj, mlp.up_proj):
            mlp.w_gate_up, changed = _fuse(mlp.gate_proj, mlp.up_proj), True
    if model.max_seq == 0:
        raise ValueError("the fused decode path needs a KV cache: call model.setup_cache first")
    device = model.embed_tokens.weight.device
    table = getattr(model, "rope_table", None)
    if table is None or table.shape[0] != model.max_seq or table.device != device:
        model.rope_table, changed = rope_table(model.inv_freq(device), model.max_seq), True
    return changed


def decode_step(model, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, V]`` of one decode step; writes k/v at ``pos`` like ``model(tokens[:, None], pos[:, None])``.

    Parameters
    ----------
    model : rtkern.model.Transformer after ``setup_cache`` and ``prepare``
    tokens : [B] int64, the current token of each row
    pos : [B] int64, each token's position, ``< model.max_seq``. Not checked: pos lives on the device and
        a check would wait for it every step; the engine holds rows past their budget at the last slot.
        A position beyond the cache writes outside the row's slots.
    """
    a = model.args
    res = model.embed_tokens(tokens)        # the residual stream: each block adds into it in place
    qkv_in_one = a.head_dim * a.dim * res.element_size() <= QKV_ROPE_MAX_SLICE_BYTES
    merge_in_o = a.n_heads * (a.head_dim + 2) * MERGE_MAX_SPLITS * 4 <= MERGE_IN_O_PROJ_MAX_BYTES
    for layer in model.layers:
        attn, mlp, kv = layer.self_attn, layer.mlp, layer.self_attn.kv_cache
        ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
        cache = (pos, model.rope_table, kv.k_cache, kv.v_cache, a.n_heads, a.n_kv_heads)
        if qkv_in_one:
            q = qkv_rope(res, attn.wqkv, *cache, norm_weight=ln1.weight, eps=ln1.eps)
        else:
            q = rope_cache_update(fused_linear(res, attn.wqkv, norm_weight=ln1.weight, eps=ln1.eps), *cache)
        if merge_in_o:
            partials = decode_attention_partials(q, kv.k_cache, kv.v_cache, pos, max_splits=MERGE_MAX_SPLITS)
            attention_out_proj(*partials, attn.o_proj.weight, res)
        else:
            fused_linear(decode_attention(q, kv.k_cache, kv.v_cache, pos), attn.o_proj.weight, residual=res)
        act = fused_linear(res, mlp.w_gate_up, norm_weight=ln2.weight, eps=ln2.eps, swiglu=True)
        fused_linear(act, mlp.down_proj.weight, residual=res)
    return fused_linear(res, model.lm_head.weight, norm_weight=model.norm.weight, eps=model.norm.eps)
