"""The decoder's Triton kernels against the torch ops they replace, one decode step's shapes at a time.

For each op and model shape (SmolLM2-135M, Llama-3-8B) at batch B, these implementations are timed.
Ops: the fused decode step's — ``norm_qkv_rope`` (or ``norm_qkv`` then ``rope_cache``),
``attention_o_residual`` (chunked attention, then the merge inside the o-projection; or
``decode_attention`` then ``o_residual``), ``norm_gate_up_swiglu``, ``down_residual``, ``lm_head`` — and
the standalone ``add_rmsnorm`` and ``swiglu``.

===============  ======================================================================================
impl             what runs
===============  ======================================================================================
``torch``        the ops ``rtkern.model.Transformer.forward`` runs for the same step (the reference path)
``torch-compile`` ``torch.compile`` of that (default mode)
``triton``       rtkern's kernel (``rtkern.kernels.*``) through its Python launcher
``cublas``       the GEMM ops only: the bare ``F.linear`` without the fused norm or epilogue — how close
                 the Triton GEMV comes to cuBLAS on the weight read that dominates the op
===============  ======================================================================================

Columns: ``us`` = ``triton.testing.do_bench`` median (one call, L2 flushed); ``graph_us`` = per call
when 20 calls replay from one CUDA graph — the cost inside the engine's decode graph, where launch
overhead is what separates a 1-kernel op from an 8-kernel one; ``floor_us`` = bytes the op must move
/ bandwidth (the device copy bandwidth measured in the run, or ``--bandwidth``). GPU only: on a CPU the kernels run in the Triton interpreter, so only the torch rows
are timed.

Run: ``rtkern bench kernels --help``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from rtkern.argtypes import finite_float
from rtkern.kernels.attn_out_proj import attention_out_proj
from rtkern.kernels.decode_attention import decode_attention, decode_attention_partials
from rtkern.kernels.fused_linear import fused_linear, fused_linear_reference
from rtkern.kernels.qkv_rope import qkv_rope
from rtkern.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_reference
from rtkern.kernels.rope_cache import rope_cache_update, rope_table
from rtkern.kernels.swiglu import swiglu, swiglu_reference
from rtkern.model import ModelArgs, _decode_attention, apply_rope, rope_inv_freq

from .sampler import DTYPES, _capture, copy_bandwidth, environment, time_call

DEFAULT_OUT = Path("results") / "bench-kernels"
GEMM_OPS = ("norm_qkv", "o_residual", "norm_gate_up_swiglu", "down_residual", "lm_head")
OPS = ("add_rmsnorm", "rope_cache", "norm_qkv_rope", "decode_attention", "attention_o_residual",
       "swiglu") + GEMM_OPS
IMPLS = ("torch", "torch-compile", "triton", "cublas")
CONTEXT = 384  # prompt 128 + 256 new tokens: the decode benchmark's longest context


@dataclass
class Row:
    op: str
    model: str
    batch: int
    impl: str
    us: Optional[float] = None
    graph_us: Optional[float] = None
    floor_us: Optional[float] = None
    note: str = ""


def _torch_rope_cache(qkv, pos, inv_freq, k_cache, v_cache, H, n_kv):
    # what Transformer.forward does for one token per row: angles, cos/sin, two rotations, two index_puts
    B, Dh = qkv.shape[0], k_cache.shape[-1]
    x = qkv.view(B, 1, H + 2 * n_kv, Dh).transpose(1, 2)
    q, k, v = x[:, :H], x[:, H:H + n_kv], x[:, H + n_kv:]
    freqs = pos.float()[:, None, None] * inv_freq
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(qkv.dtype)[:, None], emb.sin().to(qkv.dtype)[:, None]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rows = torch.arange(B, device=qkv.device)[:, None]
    k_cache[:B][rows, :, pos[:, None]] = k.transpose(1, 2)
    v_cache[:B][rows, :, pos[:, None]] = v.transpose(1, 2)
    return q


def _torch_attention(q, k_cache, v_cache, pos):
    mask = torch.arange(k_cache.shape[2], device=q.device) <= pos[:, None]
    return _decode_attention(q[:, :, None], k_cache[:q.shape[0]], v_cache[:q.shape[0]], mask[:, None])


def _gemm_op(op: str, args: ModelArgs, B: int, rnd) -> tuple[dict[str, Callable], int]:
    """A fused_linear op of the decode step: (implementations, elements it must move)."""
    D, H, n_kv, Dh, I = args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.intermediate_size
    n_in, n_out, kw = {
        "norm_qkv": (D, (H + 2 * n_kv) * Dh, dict(norm_weight=rnd(D))),
        "o_residual": (H * Dh, D, dict(residual=rnd(B, D))),
        "norm_gate_up_swiglu": (D, 2 * I, dict(norm_weight=rnd(D), swiglu=True)),
        "down_residual": (I, D, dict(residual=rnd(B, D))),
        "lm_head": (D, args.vocab_size, dict(norm_weight=rnd(D))),
    }[op]
    x, w = rnd(B, n_in), rnd(n_out, n_in) * n_in ** -0.5
    fns = {"torch": lambda: fused_linear_reference(x, w, **kw), "triton": lambda: fused_linear(x, w, **kw),
           "cublas": lambda: torch.nn.functional.linear(x, w)}
    n_written = n_out // 2 if kw.get("swiglu") else n_out
    return fns, (n_in * n_out + B * n_in + B * n_written * (2 if "residual" in kw else 1)
                 + (n_in if "norm_weight" in kw else 0))


def make_op(op: str, args: ModelArgs, B: int, dtype, device) -> tuple[dict[str, Callable], int]:
    """The implementations of ``op`` as zero-argument callables on fresh inputs, and the bytes it must move."""
    elt = torch.finfo(dtype).bits // 8
    D, H, n_kv, Dh, I = args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.intermediate_size
    rnd = lambda *s: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    if op in GEMM_OPS:
        fns, elements = _gemm_op(op, args, B, rnd)
        return fns, elements * elt
    if op == "add_rmsnorm":
        x, r, w = rnd(B, D), rnd(B, D), rnd(D)
        ref = lambda: add_rmsnorm_reference(x, w, 1e-5, r)  # noqa: E731
        return {"torch": ref, "triton": lambda: add_rmsnorm(x, w, 1e-5, r)}, 4 * B * D * elt + D * elt
    if op == "swiglu":
        gu = rnd(B, 2 * I)
        return {"torch": lambda: swiglu_reference(gu), "triton": lambda: swiglu(gu)}, 3 * B * I * elt
    pos = torch.full((B,), CONTEXT - 1, dtype=torch.int64, device=device)
    k_cache, v_cache = rnd(B, n_kv, CONTEXT, Dh), rnd(B, n_kv, CONTEXT, Dh)
    if op == "rope_cache":
        qkv, inv = rnd(B, (H + 2 * n_kv) * Dh), rope_inv_freq(args).to(device)
        table = rope_table(inv, CONTEXT)
        return {"torch": lambda: _torch_rope_cache(qkv, pos, inv, k_cache, v_cache, H, n_kv),
                "triton": lambda: rope_cache_update(qkv, pos, table, k_cache, v_cache, H, n_kv)}, \
            2 * B * (H + 2 * n_kv) * Dh * elt + B * Dh * 4   # one float32 table row per batch row
    if op == "norm_qkv_rope":
        x, nw, inv = rnd(B, D), rnd(D), rope_inv_freq(args).to(device)
        w, table = rnd((H + 2 * n_kv) * Dh, D) * D ** -0.5, rope_table(inv, CONTEXT)
        torch_fn = lambda: _torch_rope_cache(fused_linear_reference(x, w, norm_weight=nw), pos, inv,  # noqa: E731
                                             k_cache, v_cache, H, n_kv)
        return {"torch": torch_fn, "triton": lambda: qkv_rope(x, w, pos, table, k_cache, v_cache, H, n_kv,
                                                              norm_weight=nw),
                "cublas": lambda: torch.nn.functional.linear(x, w)}, \
            (w.numel() + B * D + D + B * (H + 2 * n_kv) * Dh) * elt + B * Dh * 4
    if op == "attention_o_residual":
        q, w, r = rnd(B, H, Dh), rnd(D, H * Dh) * (H * Dh) ** -0.5, rnd(B, D)
        torch_fn = lambda: r + torch.nn.functional.linear(  # noqa: E731
            _torch_attention(q, k_cache, v_cache, pos).reshape(B, H * Dh), w)
        triton_fn = lambda: attention_out_proj(  # noqa: E731
            *decode_attention_partials(q, k_cache, v_cache, pos, max_splits=16), w, r)
        return {"torch": torch_fn, "triton": triton_fn}, \
            (2 * B * n_kv * CONTEXT * Dh + B * H * Dh + w.numel() + 2 * B * D) * elt
    if op == "decode_attention":
        q = rnd(B, H, Dh)
        return {"torch": lambda: _torch_attention(q, k_cache, v_cache, pos),
                "triton": lambda: decode_attention(q, k_cache, v_cache, pos)}, \
            2 * B * n_kv * CONTEXT * Dh * elt + 2 * B * H * Dh * elt
    raise ValueError(f"unknown op {op!r}; known: {list(OPS)}")


def graph_time_us(call: Callable, calls: int = 20) -> float:
    """Per-call device time when ``calls`` back-to-back calls replay from one CUDA graph."""
    from triton.testing import do_bench
    g, _ = _capture(lambda: [call() for _ in range(calls)])
    return do_bench(g.replay, warmup=10, rep=50, return_mode="median") * 1e3 / calls


def bench_op(op: str, name: str, B: int, dtype, device, impls: Sequence[str], bandwidth: float) -> list[Row]:
    args = ModelArgs.from_name(name)
    fns, nbytes = make_op(op, args, B, dtype, device)
    if "torch-compile" in impls:
        # Dynamo caches per code object: the same lambda at 30 shapes would pass the recompile limit and
        # quietly run eager (or turn dynamic). A fresh cache per point keeps every row static-shape code.
        torch._dynamo.reset()
        fns["torch-compile"] = torch.compile(fns["torch"], dynamic=False)
    rows = []
    for impl in (i for i in impls if i in fns):
        row = Row(op, name, B, impl, floor_us=nbytes / bandwidth * 1e6)
        if impl == "triton" and device.type != "cuda":
            row.note = "skipped: Triton kernels are only timed on CUDA"
        else:
            try:
                row.us = time_call(fns[impl], device)[0]
                row.graph_us = graph_time_us(fns[impl]) if device.type == "cuda" else None
            except Exception as e:  # noqa: BLE001  (a baseline failing is a result, not a crash)
                row.note = f"failed: {type(e).__name__}: {e}"[:200]
        rows.append(row)
    return rows


def format_table(rows: Sequence[Row]) -> str:
    f = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
    lines = ["| op | model | B | impl | us | graph_us | floor_us | note |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.op} | {r.model} | {r.batch} | {r.impl} | {f(r.us)} | {f(r.graph_us)} | {f(r.floor_us)} | "
              f"{r.note} |" for r in rows]
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path) -> Optional[Path]:
    timed = [r for r in rows if (r.graph_us or r.us) is not None]
    if not timed:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = sorted({(r.op, r.model, r.batch) for r in timed}, key=str)
    impls = [i for i in IMPLS if any(r.impl == i for r in timed)]
    fig, ax = plt.subplots(figsize=(max(6, len(groups) * 0.7), 4))
    for j, impl in enumerate(impls):
        vals = [next((r.graph_us or r.us for r in timed if (r.op, r.model, r.batch) == g and r.impl == impl), 0)
                for g in groups]
        ax.bar([i + j * 0.8 / len(impls) for i in range(len(groups))], vals, 0.8 / len(impls), label=impl)
    ax.set_xticks(range(len(groups)), [f"{o}\n{m}\nB={b}" for o, m, b in groups], fontsize=6)
    ax.set_ylabel("µs per call (in a CUDA graph where available)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    p.add_argument("--models", default="smollm2-135m,llama3-8b", help="ModelArgs names whose shapes to use")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--bandwidth", type=finite_float(0.0, strict=True), default=None,
                   help="bytes/s for floor_us (default: the device copy bandwidth, measured in the run)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_from_args(a: argparse.Namespace) -> int:
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ops, impls = a.ops.split(","), a.impls.split(",")
    for name, got, known in (("op", ops, OPS), ("impl", impls, IMPLS)):
        bad = [x for x in got if x not in known]
        if bad:
            raise SystemExit(f"unknown {name}(s) {bad}; known: {list(known)}")
    if device.type != "cuda" and "torch-compile" in impls:
        impls.remove("torch-compile")   # minutes of CPU compilation for numbers nobody needs
    from tqdm import tqdm
    points = [(m, op, int(b)) for m in a.models.split(",") for op in ops for b in a.batches.split(",")]
    bandwidth = a.bandwidth or copy_bandwidth(device)
    rows, env = [], environment(device)
    a.out.mkdir(parents=True, exist_ok=True)
    for name, op, B in tqdm(points, desc="kernels", unit="point", disable=a.no_progress):
        rows += bench_op(op, name, B, DTYPES[a.dtype], device, impls, bandwidth)
        # after every point: a run stopped at a device call's time limit keeps what it measured
        (a.out / "kernels.json").write_text(json.dumps({"environment": env, "dtype": a.dtype,
                                                        "rows": [asdict(r) for r in rows]}, indent=1))
        (a.out / "kernels.md").write_text(format_table(rows) + "\n")
    png = plot(rows, a.out / "kernels.png")
    print(format_table(rows))
    print(f"\nwrote {a.out / 'kernels.json'}, {a.out / 'kernels.md'}" + (f", {png}" if png else ""))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="rtkern bench kernels", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
