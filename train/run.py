"""Build a whole run from a `TrainConfig`: base model (or checkpoint to resume), control tokens, data,
trainer."""
from __future__ import annotations

import collections
import logging
from pathlib import Path

import torch

from ..loader import load_model
from .checkpoint import checkpoint_step, list_checkpoints, load_control_tokens
from .config import TrainConfig
from .data import build_examples, load_data
from .prepare import add_control_tokens
from .trainer import DistInfo, Trainer, init_distributed

log = logging.getLogger("rtkern.train")


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from: ``cfg.resume`` as a path, or ``"auto"`` = newest in ``cfg.out``.

    Raises FileNotFoundError when there is none: training from the base instead would clear the run's
    metrics and overwrite its ``final/``.
    """
    existing = list_checkpoints(cfg.out)
    if cfg.resume is None:
        # Pruning keeps the newest steps whatever run wrote them: an earlier run's checkpoints would
        # outlive (and delete) this run's, and --resume would later pick them up.
        if existing:
            raise ValueError(f"{cfg.out} holds checkpoints of an earlier run ({_names(existing)}): continue it "
                             "with --resume, or start the new run in another --out (or delete them)")
        return None
    if cfg.resume == "auto":
        if not existing:
            raise FileNotFoundError(f"--resume: no resumable checkpoint in {cfg.out} (checkpoint-N folders "
                                    "with trainer_state.json); drop --resume to start a new run")
        return existing[-1]
    p = Path(cfg.resume)
    if not p.is_dir():
        raise FileNotFoundError(f"resume: {p} is not a checkpoint directory")
    step = checkpoint_step(p)
    later = [c for c in existing if step is not None and checkpoint_step(c) > step]
    if later:  # the abandoned timeline's steps would outrank this run's when pruning
        raise ValueError(f"{cfg.out} holds checkpoints after {p.name} ({_names(later)}); delete them to go back "
                         f"to {p.name}, or resume from it into another --out")
    return p


def _names(paths) -> str:
    return ", ".join(p.name for p in paths)


def training_device(cfg: TrainConfig, dist_info: DistInfo) -> torch.device:
    if cfg.device:
        dev = torch.device(cfg.device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", dist_info.local_rank)
        return dev
    return torch.device("cuda", dist_info.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def build_trainer(cfg: TrainConfig, dist_info: DistInfo | None = None) -> Trainer:
    """Load the base (or the checkpoint to resume), add control tokens, read and tokenize the data.

    Parameters
    ----------
    cfg : TrainConfig
    dist_info : DistInfo, optional
        Default: `init_distributed` (torchrun's environment, else a single process).
    """
    if not cfg.data:
        raise ValueError("no training data: pass --data (a folder laid out like shared/data, or files)")
    dist_info = dist_info or init_distributed(cfg.device)
    device = training_device(cfg, dist_info)
    # FSDP moves the model to the GPU shard by shard: a model that does not fit one GPU must not go there whole
    load_device = torch.device("cpu") if cfg.parallel == "fsdp" and dist_info.world > 1 else device
    resume = resolve_resume(cfg)
    if resume is not None:
        model, tok = load_model(resume, device=load_device, dtype=torch.float32)
        control = load_control_tokens(resume)
        if control.scheme != cfg.scheme:
            raise ValueError(f"{resume} was trained with scheme {control.scheme!r}, config says {cfg.scheme!r}")
        tok.add_control_tokens(list(control.refusal_tokens) + [control.respond_token])
        log.info("resuming from %s", resume)
    else:
        model, tok = load_model(cfg.base, device=load_device, dtype=torch.float32)
        control = add_control_tokens(model, tok, cfg.scheme)
    records = load_data(cfg.data)
    examples = build_examples(tok, records, control, max_len=cfg.seq_len)
    if dist_info.is_main:
        counts = collections.Counter(e.pool for e in examples)
        log.info("%d examples (%s), %d tokens, %d trained", len(examples), dict(counts),
                 sum(len(e.ids) for e in examples), sum(len(e.ids) - e.n_prompt for e in examples))
    trainer = Trainer(cfg, model, tok, control, examples, dist_info=dist_info, device=device)
    if resume is not None:
        trainer.load_state(resume)
    return trainer
