"""Checkpoints: Hugging Face-compatible model directories plus the trainer state for exact resume.

A checkpoint directory holds ``config.json``, ``generation_config.json``, ``model.safetensors``, the
tokenizer files (with the control tokens as added special tokens), ``rtkern.json`` (control tokens,
categories, scheme) and, for resumable checkpoints, ``trainer_state.json`` (step, data position, config)
and ``trainer_state.pt`` (optimizer and RNG tensors; written with ``torch.save``, read with
``torch.load(weights_only=True)``: no pickled code). Directories appear atomically: everything is
written to a hidden temporary sibling which is then renamed into place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..model import rtkern_to_hf_state_dict
from .prepare import ControlTokens

CONTROL_FILE = "rtkern.json"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.pt"
_STEP_DIR = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def save_checkpoint(path, model, tokenizer, control: ControlTokens, *, state: dict | None = None,
                    tensors: dict | None = None) -> Path:
    """Write a checkpoint directory atomically (an existing one at ``path`` is replaced).

    Parameters
    ----------
    path : str or Path
        Final directory.
    model : rtkern.model.Transformer
    tokenizer : rtkern.tokenizer.Tokenizer
        Must be backed by a Hugging Face tokenizer (``tokenizer.json``).
    control : ControlTokens
    state : dict, optional
        JSON-serialisable trainer state (step, data position, config, ...).
    tensors : dict, optional
        Optimizer state dict, RNG states and other tensors; saved with ``torch.save``.

    Returns
    -------
    Path
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_model_files(tmp, model, tokenizer, control)
        if state is not None:
            _write_json(tmp / STATE_JSON, state)
        if tensors is not None:
            torch.save(tensors, tmp / STATE_TENSORS)
        _fsync_dir(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_model_files(d: Path, model, tokenizer, control: ControlTokens) -> None:
    """config.json, generation_config.json, model.safetensors, tokenizer files and rtkern.json in ``d``."""
    from safetensors.torch import save_file

    args = model.args
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, the model only {args.vocab_size} rows")
    cfg = args.to_hf_config()
    cfg["torch_dtype"] = cfg["dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    _write_json(d / "config.json", cfg)
    _write_json(d / "generation_config.json", {"bos_token_id": tokenizer.bos_id,
                                               "eos_token_id": list(tokenizer.eos_ids)})
    tied = model.lm_head.weight is model.embed_tokens.weight
    sd = rtkern_to_hf_state_dict(model.state_dict(), tie_word_embeddings=tied)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    hf = getattr(tokenizer, "_hf", None)
    if hf is None:
        raise NotImplementedError("saving needs a Hugging Face (tokenizer.json) tokenizer; "
                                  "sentencepiece-only tokenizers cannot be saved yet")
    if tokenizer.chat_template and not getattr(hf, "chat_template", None):
        hf.chat_template = tokenizer.chat_template     # GGUF-derived tokenizers keep it outside
    hf.save_pretrained(str(d))
    _write_json(d / CONTROL_FILE, control.to_json())


def load_control_tokens(path) -> ControlTokens:
    """The `ControlTokens` recorded in a checkpoint's ``rtkern.json``."""
    f = Path(path) / CONTROL_FILE
    try:
        return ControlTokens.from_json(json.loads(f.read_text(encoding="utf-8")))
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: invalid JSON: {e}") from e


def load_trainer_state(path) -> tuple[dict, dict]:
    """``(state, tensors)`` of a resumable checkpoint (``torch.load`` with ``weights_only=True``)."""
    path = Path(path)
    for name in (STATE_JSON, STATE_TENSORS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: not a resumable checkpoint (no {name})")
    state = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
    tensors = torch.load(path / STATE_TENSORS, map_location="cpu", weights_only=True)
    return state, tensors


def list_checkpoints(out_dir) -> list[Path]:
    """Complete ``checkpoint-N`` directories under ``out_dir``, oldest step first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name)) and (p / STATE_JSON).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir) -> Path | None:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(out_dir, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (``keep <= 0``: keep all); return the deleted."""
    ckpts = list_checkpoints(out_dir)
    doomed = ckpts[:-keep] if keep > 0 else []
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(d: Path) -> None:
    for p in d.iterdir():
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
