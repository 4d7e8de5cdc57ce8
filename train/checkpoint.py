"""Checkpoints: Hugging Face-compatible model directories plus the trainer state for exact resume.

A checkpoint directory holds ``config.json``, ``generation_config.json``, ``model.safetensors``, the
tokenizer files (with the control tokens as added special tokens), ``rtkern.json`` (control tokens,
categories, scheme) and, for resumable checkpoints, ``trainer_state.json`` (step, data position, data
layout, metrics since the last record, config) and ``trainer_state.pt`` (optimizer and RNG tensors, the
loss since the last metrics record; written with ``torch.save``, read with
``torch.load(weights_only=True)``: no pickled code). Directories appear atomically: everything is
written to a hidden temporary sibling which is then renamed into place.

"Exact" means the resumed run sees the same rows, learning rates, optimizer state and RNG streams as an
uninterrupted one: on the CPU its losses match bit for bit (tested); on a GPU, kernels whose reductions
are not deterministic (attention backward, cuBLAS split-K) leave float-rounding differences.
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


def checkpoint_step(path) -> int | None:
    """The step a checkpoint was saved at (its trainer state, else its ``checkpoint-N`` name), or None."""
    try:
        return int(json.loads((Path(path) / STATE_JSON).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        m = _STEP_DIR.match(Path(path).name)
        return int(m.group(1)) if m else None


def save_checkpoint(path, model, tokenizer, control: ControlTokens, *, state: dict | None = None,
                    tensors: dict | None = None, state_dict: dict | None = None) -> Path:
    """Write a checkpoint directory atomically (an existing one at ``path`` is replaced).

    Parameters
    ----------
    path : str or Path
        Final directory.
    model : rtkern.model.Transformer
    tokenizer : rtkern.tokenizer.Tokenizer
        Hugging Face (``tokenizer.json``) or sentencepiece (``tokenizer.model``) backed.
    control : ControlTokens
    state : dict, optional
        JSON-serialisable trainer state (step, data position, config, ...).
    tensors : dict, optional
        Optimizer state dict, RNG states and other tensors; saved with ``torch.save``.
    state_dict : dict, optional
        The model's weights (default ``model.state_dict()``); FSDP passes the gathered full state dict.

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
        write_model_files(tmp, model, tokenizer, control, state_dict=state_dict)
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


def write_model_files(d: Path, model, tokenizer, control: ControlTokens, *, state_dict: dict | None = None) -> None:
    """config.json, generation_config.json, model.safetensors, tokenizer files and rtkern.json in ``d``.

    ``state_dict``: the weights to write (default ``model.state_dict()``; ``model`` still gives the
    architecture and whether the head is tied).
    """
    from safetensors.torch import save_file

    args = model.args
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, the model only {args.vocab_size} rows")
    sd = model.state_dict() if state_dict is None else state_dict
    if "embed_tokens.weight" not in sd:
        raise ValueError("state_dict has no 'embed_tokens.weight': not an rtkern Transformer's state dict")
    cfg = args.to_hf_config()
    cfg["torch_dtype"] = cfg["dtype"] = str(sd["embed_tokens.weight"].dtype).removeprefix("torch.")
    _write_json(d / "config.json", cfg)
    _write_json(d / "generation_config.json", {"bos_token_id": tokenizer.bos_id,
                                               "eos_token_id": list(tokenizer.eos_ids)})
    tied = model.lm_head.weight is model.embed_tokens.weight
    sd = rtkern_to_hf_state_dict(sd, tie_word_embeddings=tied)
    save_file({k: _own_storage(v.detach().to("cpu").contiguous()) for k, v in sd.items()},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer_files(d, tokenizer, control)
    _write_json(d / CONTROL_FILE, control.to_json())


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses tensors that share storage, e.g. q/k/v weights made views of one fused tensor
    # by rtkern.fused_decode.prepare
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def write_tokenizer_files(d: Path, tokenizer, control: ControlTokens) -> None:
    """The tokenizer, control tokens included as added special tokens, in a form transformers and rtkern load.

    Hugging Face tokenizers save themselves. A sentencepiece-only tokenizer is written as its
    ``tokenizer.model`` plus a ``tokenizer_config.json`` that declares the control tokens (and the model's
    own control pieces such as ``<s>``) as special tokens at their ids; see `sentencepiece_tokenizer_config`.
    """
    hf = getattr(tokenizer, "_hf", None)
    if hf is not None:
        if tokenizer.chat_template and not getattr(hf, "chat_template", None):
            hf.chat_template = tokenizer.chat_template     # GGUF-derived tokenizers keep it outside
        hf.save_pretrained(str(d))
        return
    sp = getattr(tokenizer, "_sp", None)
    if sp is None:
        raise TypeError(f"cannot save a {type(tokenizer).__name__}: neither Hugging Face nor sentencepiece backed")
    (d / "tokenizer.model").write_bytes(sp.sp.serialized_model_proto())
    _write_json(d / "tokenizer_config.json", sentencepiece_tokenizer_config(tokenizer, control))


def sentencepiece_tokenizer_config(tokenizer, control: ControlTokens) -> dict:
    """``tokenizer_config.json`` for a sentencepiece-only tokenizer with added control tokens.

    The class is transformers' ``SentencePieceBackend`` (transformers >= 5): it runs the
    ``tokenizer.model`` itself, as rtkern does, so both tokenize text identically; converting it to a
    fast tokenizer would need protobuf and may differ for some normalizers. Special tokens: the model's
    control and unknown pieces (which rtkern recognises in text, e.g. chat markers) and the added
    control tokens, at the ids rtkern gives them (after the model's pieces, in ``rtkern.json`` order).

    Parameters
    ----------
    tokenizer : rtkern.tokenizer.Tokenizer
        Sentencepiece backed.
    control : ControlTokens

    Returns
    -------
    dict
    """
    sp = tokenizer._sp
    proc, n = sp.sp, sp.sp.get_piece_size()
    order = list(control.refusal_tokens) + [control.respond_token]
    want = {s: n + k for k, s in enumerate(order)}
    if sp.added != want:
        # rtkern re-adds rtkern.json's tokens in that order when loading; other ids would not survive
        raise ValueError(f"the tokenizer's added tokens {sp.added} are not the control tokens in order {want}")
    specials = {i: proc.id_to_piece(i) for i in range(n) if proc.is_control(i) or proc.is_unknown(i)}
    specials.update({i: s for s, i in want.items()})
    piece = sp.piece
    cfg = {"tokenizer_class": "SentencePieceBackend", "legacy": True, "clean_up_tokenization_spaces": False,
           "added_tokens_decoder": {str(i): _added_token(s) for i, s in sorted(specials.items())},
           "extra_special_tokens": order}
    for key, i in (("bos_token", sp.bos_id), ("eos_token", sp.eos_id), ("unk_token", proc.unk_id())):
        if i is not None and i >= 0:
            cfg[key] = piece(i)
    if tokenizer.chat_template:
        cfg["chat_template"] = tokenizer.chat_template
    return cfg


def _added_token(content: str) -> dict:
    # normalized=False: the text is matched verbatim, before sentencepiece's normaliser sees it
    return {"content": content, "special": True, "normalized": False, "lstrip": False, "rstrip": False,
            "single_word": False}


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
