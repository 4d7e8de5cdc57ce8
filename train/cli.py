"""``rtkern train``: SFT with refusal tokens from the command line (also under ``torchrun``).

Settings come from, in increasing priority: `TrainConfig` defaults, ``--config FILE.json``, the named
flags, then ``--set KEY=VALUE`` (any `TrainConfig` field).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

EXIT_ERROR = 1

# flag -> TrainConfig field (flags left unset do not override the config file)
_FLAGS = {
    "--base": ("base", str, "base model: embedded name, HF checkpoint dir or .gguf (default smollm2-135m-instruct)"),
    "--scheme": ("scheme", str, "control tokens: 'single' ([refuse]) or 'category' (one per CoCoNot category)"),
    "--out": ("out", str, "output folder: checkpoints, final/, metrics.jsonl, loss.png"),
    "--mix": ("mix", str, "refusal:contrast:respond weights, e.g. 1:1:2 (default: every example once)"),
    "--epoch-examples": ("epoch_examples", int, "examples per epoch when --mix is given (default: all pools' total)"),
    "--seq-len": ("seq_len", int, "max tokens per row (longer responses are cut)"),
    "--batch-size": ("batch_size", int, "rows per micro-batch per process"),
    "--grad-accum": ("grad_accum", int, "micro-batches per optimizer step"),
    "--epochs": ("epochs", float, "epochs (ignored with --max-steps)"),
    "--max-steps": ("max_steps", int, "optimizer steps"),
    "--lr": ("lr", float, "peak learning rate"),
    "--warmup-steps": ("warmup_steps", int, "linear warmup steps (default 3%% of the run)"),
    "--weight-decay": ("weight_decay", float, "AdamW decay on matrices (1-D params never decay)"),
    "--grad-clip": ("grad_clip", float, "max global grad norm (0: no clipping)"),
    "--dtype": ("dtype", str, "autocast compute dtype: auto (bf16 on CUDA), bf16, fp32"),
    "--control-weight": ("control_weight", float, "loss weight of the control token relative to response "
                                                  "tokens (default 1: the plain completion loss)"),
    "--ce-chunk": ("ce_chunk", int, "tokens per chunk of the chunked cross-entropy"),
    "--save-every": ("save_every", int, "save a resumable checkpoint every N steps (0: only at the end/on SIGTERM)"),
    "--keep-last": ("keep_last", int, "resumable checkpoints to keep"),
    "--log-every": ("log_every", int, "steps between metrics records"),
    "--seed": ("seed", int, "seed for data order and init"),
    "--device": ("device", str, "cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when available)"),
    "--kernels": ("kernels", str, "torch, or triton: RMSNorm and SwiGLU forward/backward on rtkern's Triton "
                                  "kernels (CUDA; the CPU only through TRITON_INTERPRET=1)"),
    "--parallel": ("parallel", str, "under torchrun: ddp (auto) or fsdp (FSDP2: shards parameters, gradients "
                                    "and optimizer state, for models that do not fit one GPU)"),
}
_SWITCHES = {
    "--packing": ("packing", "pack several examples per row (per-sequence positions, no cross attention)"),
    "--activation-checkpointing": ("activation_checkpointing", "recompute block activations in backward"),
    "--compile": ("compile", "torch.compile each transformer block"),
}


def configure(p: argparse.ArgumentParser) -> None:
    """Add ``rtkern train`` options to ``p``."""
    p.add_argument("--data", nargs="+", action="extend", default=argparse.SUPPRESS, metavar="PATH",
                   help="a folder laid out like shared/data (the README recipe) and/or files "
                        "FILE[@refusal|contrast|respond] (JSONL/JSON/CSV: prompt,response[,category]; "
                        "Alpaca, Dolly, self-instruct, messages, CoCoNot)")
    from .config import PARALLEL_MODES
    choices = {"--scheme": ("single", "category"), "--dtype": ("auto", "bf16", "fp32"), "--parallel": PARALLEL_MODES,
               "--kernels": ("torch", "triton")}
    for flag, (_, typ, help_) in _FLAGS.items():
        p.add_argument(flag, type=typ, default=argparse.SUPPRESS, choices=choices.get(flag), help=help_)
    for flag, (_, help_) in _SWITCHES.items():
        p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_)
    p.add_argument("--resume", nargs="?", const="auto", default=argparse.SUPPRESS, metavar="CKPT",
                   help="resume from a checkpoint dir, or (no value) the newest one in --out")
    p.add_argument("--config", default=None, metavar="JSON", help="TrainConfig fields as a JSON object")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any TrainConfig field (repeatable), e.g. --set min_lr_ratio=0")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--no-plot", action="store_true", help="no loss-curve PNG")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")


def config_from_args(args: argparse.Namespace):
    """The resolved `TrainConfig` (defaults < --config < flags < --set)."""
    from .config import TrainConfig

    d = TrainConfig.from_json(args.config).to_dict() if getattr(args, "config", None) else TrainConfig().to_dict()
    ns = vars(args)
    for flag, (field, _, _) in _FLAGS.items():
        key = flag[2:].replace("-", "_")
        if key in ns:
            d[field] = ns[key]
    for flag, (field, _) in _SWITCHES.items():
        key = flag[2:].replace("-", "_")
        if key in ns:
            d[field] = True
    if "data" in ns:
        d["data"] = list(ns["data"])
    if "resume" in ns:
        d["resume"] = ns["resume"]
    if ns.get("no_progress"):
        d["progress"] = False
    if ns.get("no_plot"):
        d["plot"] = False
    return TrainConfig.from_dict(d).with_overrides(ns.get("set") or [])


def run(args: argparse.Namespace) -> int:
    """Run ``rtkern train``; returns the exit status (128 + signal when interrupted after saving)."""
    from .data import DataError

    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"rtkern train: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if getattr(args, "print_config", False):
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch.distributed as dist
    from .run import build_trainer

    try:
        trainer = build_trainer(cfg)
        result = trainer.train()
    except (DataError, ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"rtkern train: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if not trainer.dist.is_main:
        return 0 if result["status"] == "completed" else 128 + int(trainer._stop_signal or 15)
    last = result["losses"][-1][1] if result["losses"] else float("nan")
    if result["status"] == "completed":
        print(f"rtkern train: done, {result['step']} steps, last loss {last:.4f}; model in {result['path']}")
        return 0
    print(f"rtkern train: interrupted at step {result['step']}; resumable checkpoint in {result['path']} "
          f"(continue with --resume)", file=sys.stderr)
    return 128 + int(trainer._stop_signal or 15)
