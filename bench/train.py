"""Training throughput and peak memory: rtkern's SFT step against a plain transformers training loop.

Both train the same float32 master weights (random init of the named shape) on the same batch of
``B`` rows x ``T`` tokens, the first ``--prompt-frac`` of each row masked out of the loss (completion-only,
as SFT does), with bf16 autocast on CUDA, AdamW and gradient clipping:

=================  ========================================================================================
method             one optimizer step
=================  ========================================================================================
``rtkern``         ``rtkern.train.trainer.SFTModule``: our Transformer, hidden states of the target positions
                   only, chunked cross-entropy (no ``[B*T, V]`` float32 logits), ``build_optimizer``
``rtkern-compile`` the same with each block ``torch.compile``-d (``TrainConfig.compile``)
``rtkern-ckpt``    the same with activation checkpointing
``rtkern-triton``  the same with RMSNorm and SwiGLU on rtkern's Triton forward/backward (``--kernels triton``)
``hf``             ``LlamaForCausalLM(input_ids, labels=...)`` (its default attention and loss), torch AdamW
=================  ========================================================================================

``tok/s`` counts every token of the batch per second over ``--steps`` timed steps after ``--warmup``;
``peak_GiB`` is ``torch.cuda.max_memory_allocated`` over those steps (weights, grads, optimizer state and
activations; CUDA only). ``loss0`` is the first step's loss: the same weights and data give the same loss
(to bf16 rounding) whichever method computes it. Each method runs alone, after the previous one's memory
is released.

Run: ``rtkern bench train --help``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from rtkern.argtypes import int_at_least
from rtkern.model import ModelArgs, Transformer, rtkern_to_hf_state_dict

from .decode import random_weights_
from .sampler import environment

DEFAULT_OUT = Path("results") / "bench-train"
METHODS = ("rtkern", "rtkern-compile", "rtkern-ckpt", "rtkern-triton", "hf")


@dataclass
class Row:
    method: str
    batch: int
    seq: int
    tok_s: Optional[float] = None
    step_ms: Optional[float] = None
    peak_gib: Optional[float] = None
    loss0: Optional[float] = None
    error: Optional[str] = None


def model_args(name: str) -> ModelArgs:
    """A ``ModelArgs`` name (``smollm2-135m``, ``llama3-8b``...) or a folder holding a HF ``config.json``."""
    path = Path(name)
    if (path / "config.json").is_file():
        return ModelArgs.from_hf_config(json.loads((path / "config.json").read_text()))
    return ModelArgs.from_name(name)


def make_batch(args: ModelArgs, B: int, T: int, prompt_frac: float, device) -> dict:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (B, T), generator=g)
    p = int(T * prompt_frac)
    labels = tokens.clone()
    labels[:, :p] = -100                       # what HF expects for untrained positions
    # rtkern's layout: flat indices of the positions that predict a target, and those targets
    pos = torch.arange(p - 1 if p > 0 else 0, T - 1)
    index = (torch.arange(B)[:, None] * T + pos).reshape(-1)
    targets = tokens[:, pos + 1].reshape(-1)
    return {k: v.to(device) for k, v in dict(tokens=tokens, labels=labels, index=index, targets=targets).items()}


def _init(args: ModelArgs, device) -> Transformer:
    return random_weights_(Transformer(args)).to(device)


def _rtkern_step(method: str, args: ModelArgs, batch: dict, device):
    from rtkern.train.config import TrainConfig
    from rtkern.train.trainer import (SFTModule, build_optimizer, compile_blocks, enable_activation_checkpointing,
                                      use_triton_kernels)
    model = _init(args, device).train()
    if method == "rtkern-compile":
        compile_blocks(model)
    if method == "rtkern-ckpt":
        enable_activation_checkpointing(model)
    if method == "rtkern-triton":
        use_triton_kernels(model)
    module = SFTModule(model)
    n = batch["targets"].numel()
    return _optimizer_step(lambda: module(batch["tokens"], None, None, batch["index"], batch["targets"]) / n,
                           model, build_optimizer(model, TrainConfig(lr=1e-5)))


def _hf_step(args: ModelArgs, batch: dict, device):
    import transformers
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args.to_hf_config()))
    hf.load_state_dict(rtkern_to_hf_state_dict(_init(args, "cpu").state_dict()), strict=False)
    hf.tie_weights()
    hf.to(device).train()
    decay = [p for p in hf.parameters() if p.dim() > 1]
    rest = [p for p in hf.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-5, betas=(0.9, 0.95))
    return _optimizer_step(lambda: hf(input_ids=batch["tokens"], labels=batch["labels"]).loss, hf, opt)


def _optimizer_step(loss_fn, model, opt):
    """One full step, the same for every method: mean loss, backward, clip at 1.0, AdamW, zero grads."""
    def step() -> torch.Tensor:
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_method(method: str, args: ModelArgs, B: int, T: int, device, *, warmup: int, steps: int,
                 prompt_frac: float) -> Row:
    row = Row(method, B, T)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    try:
        batch = make_batch(args, B, T, prompt_frac, device)
        step = _hf_step(args, batch, device) if method == "hf" else _rtkern_step(method, args, batch, device)
        with autocast:
            row.loss0 = float(step())
            for _ in range(warmup - 1):
                step()
            _sync(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
        dt = (time.perf_counter() - t) / steps
        row.step_ms, row.tok_s = dt * 1e3, B * T / dt
        row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    except Exception as e:  # noqa: BLE001  (a failing baseline, e.g. out of memory, is a result)
        row.error = f"{type(e).__name__}: {e}"[:300]
    finally:
        step = batch = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def format_table(rows: Sequence[Row]) -> str:
    hf = next((r for r in rows if r.method == "hf" and r.tok_s), None)
    f = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    lines = ["| method | B | T | tok/s | step ms | peak GiB | vs hf tok/s | vs hf mem | loss0 | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = r.tok_s / hf.tok_s if hf and r.tok_s else None
        mem = r.peak_gib / hf.peak_gib if hf and r.peak_gib and hf.peak_gib else None
        lines.append(f"| {r.method} | {r.batch} | {r.seq} | {f(r.tok_s, ',.0f')} | {f(r.step_ms, '.1f')} | "
                     f"{f(r.peak_gib, '.2f')} | {f(speed, '.2f')} | {f(mem, '.2f')} | {f(r.loss0, '.4f')} | "
                     f"{r.error or ''} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    p.add_argument("--model", default="smollm2-135m", help="ModelArgs name or a folder with a HF config.json")
    p.add_argument("--batch", type=int_at_least(1), default=None, help="rows per step (default 8; CPU 2)")
    p.add_argument("--seq", type=int_at_least(1), default=None, help="tokens per row (default 1024; CPU 128)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                   help="default: all on CUDA; rtkern and hf on CPU")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="timed steps (default 20; CPU 2)")
    p.add_argument("--warmup", type=int_at_least(1), default=3)
    p.add_argument("--prompt-frac", type=float, default=0.3, help="leading share of each row left out of the loss")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)


def run_from_args(a: argparse.Namespace) -> int:
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    B = (8 if cuda else 2) if a.batch is None else a.batch
    T = (1024 if cuda else 128) if a.seq is None else a.seq
    steps = (20 if cuda else 2) if a.steps is None else a.steps
    if min(B, T, steps, a.warmup) < 1 or not 0 <= a.prompt_frac < 1:
        raise SystemExit("--batch, --seq, --steps, --warmup must be positive and --prompt-frac in [0, 1)")
    args = model_args(a.model)
    from tqdm import tqdm
    rows = [bench_method(m, args, B, T, device, warmup=a.warmup, steps=steps, prompt_frac=a.prompt_frac)
            for m in tqdm(a.methods or (METHODS if cuda else ("rtkern", "hf")), desc="bench train")]
    a.out.mkdir(parents=True, exist_ok=True)
    meta = {"env": environment(device), "model": a.model, "argv": sys.argv, "warmup": a.warmup, "steps": steps}
    (a.out / "train.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    table = format_table(rows)
    (a.out / "train.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {a.out / 'train.json'} and {a.out / 'train.md'}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="rtkern bench train", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
