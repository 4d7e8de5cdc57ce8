"""``rtkern calibrate``: score a labelled prompt set once, choose refusal thresholds, write the report.

    rtkern calibrate --model DIR --data ../shared/data/coconot --best-f1 --out runs/calib

writes ``report.md``, ``thresholds.json`` (read back with `rtkern.thresholds.load_thresholds`),
``scores.jsonl`` (every prompt's control-token probabilities), ``refusal_rate.png`` and ``roc.png``.
``--scores runs/calib/scores.jsonl`` chooses thresholds again from those, without the model.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .spec import RESPOND_TOKEN, RefusalSpec

EXIT_ERROR = 1


def configure(p: argparse.ArgumentParser) -> None:
    """Options of ``rtkern calibrate``."""
    p.add_argument("--model", metavar="NAME_OR_DIR",
                   help="checkpoint directory, .gguf file or embedded model name (required unless --scores)")
    p.add_argument("--data", action="append", metavar="FILE_OR_DIR",
                   help="CoCoNot folder (test-split originals = refuse, contrast = comply) or a CSV/JSONL "
                        "with prompt, label (refuse/comply or 1/0) and optional category; repeatable")
    p.add_argument("--scores", metavar="FILE",
                   help="instead of --model and --data: the scores.jsonl of an earlier run, to choose "
                        "thresholds again without scoring")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--target-rate", type=float, metavar="R",
                      help="refuse at least this fraction of the should-refuse prompts (per category)")
    goal.add_argument("--max-over-refusal", type=float, metavar="R",
                      help="refuse at most this fraction of the should-comply prompts")
    goal.add_argument("--best-f1", action="store_true", help="maximise F1 (the default)")
    p.add_argument("--keep-control", action="store_true",
                   help="with --max-over-refusal and category tokens: keep every category switchable on these "
                        "prompts (switched off, its rate drops >= 80%% and the others move <= 5 points)")
    p.add_argument("--scheme", choices=("auto", "single", "category"), default="auto",
                   help="control-token scheme (auto: the one in the checkpoint's rtkern.json, else category "
                        "tokens if present, else [refuse])")
    p.add_argument("--refusal-tokens", metavar="TOKENS",
                   help="comma-separated refusal token strings or ids, overriding --scheme")
    p.add_argument("--respond-token", metavar="TOKEN",
                   help=f"respond token string or id (default {RESPOND_TOKEN} if present; 'none' for no token)")
    p.add_argument("--mode", choices=("category", "sum"), default="category",
                   help="decision rule the thresholds are for (README 'Semantics', rule 2)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default 16)")
    p.add_argument("--max-length", type=int, help="longest rendered prompt in tokens (default: the model's)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="at most N should-refuse and N should-comply prompts, evenly spaced")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``rtkern calibrate``; returns the exit status (1 with a message on stderr on bad input)."""
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"rtkern calibrate: error: {e}", file=sys.stderr)
        return EXIT_ERROR


def _run(args: argparse.Namespace) -> int:
    from .calibrate import score
    from .calibrate_data import concat, even_subset, load_labelled
    from .loader import load_model

    _check_args(args)
    out = _out_dir(args.out)  # before the minutes of scoring, not after
    if args.scores:
        return _rerun(args, out)
    data = concat([load_labelled(d) for d in args.data])
    if args.limit is not None:
        data = even_subset(data, args.limit)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tok = load_model(args.model, device=device, dtype=dtype)
    spec = resolve_spec(tok, args)
    _check_keep_control(args, spec.num_categories, "the model")
    tok.protect(spec.control_ids)

    t0 = time.perf_counter()
    scores = score(model, tok, data.prompts, spec, batch_size=args.batch_size, max_length=args.max_length,
                   progress=not args.no_progress).numpy()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    _check_finite(scores, data, "got NaN probabilities (NaN/inf logits from the model)")
    analysis = _analyse(scores, data, spec.names, args)
    meta = _meta(args, data, spec, model, seconds)
    files = _write(out, analysis, data, spec.names, spec.respond_id is not None, scores, meta, args, spec)
    _summary(analysis, files)
    return 0


def _rerun(args: argparse.Namespace, out: Path) -> int:
    from . import __version__
    from .calibrate_data import load_scores
    saved = load_scores(args.scores)
    data = saved.data
    _check_keep_control(args, len(saved.names), args.scores)
    _check_finite(saved.scores, data, "have no probabilities (null)")
    analysis = _analyse(saved.scores, data, saved.names, args)
    meta = {"scores": args.scores, "prompts": _counts(data),
            "refusal tokens": ", ".join(saved.names), "scoring": "none (probabilities read from --scores)",
            "rtkern": __version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    files = _write(out, analysis, data, saved.names, saved.has_respond, saved.scores, meta, args)
    _summary(analysis, files)
    return 0


def _check_keep_control(args, num_categories: int, what: str) -> None:
    if args.keep_control and num_categories < 2:
        raise ValueError(f"--keep-control needs category tokens; {what} has {num_categories} refusal token")


def _check_finite(scores: np.ndarray, data, what: str) -> None:
    bad = np.flatnonzero(np.isnan(scores).any(axis=1))
    if bad.size:
        raise ValueError(f"{bad.size} prompts {what}, first at {data.sources[bad[0]]}")


def _counts(data) -> str:
    refuse = int(data.should_refuse.sum())
    return f"{len(data)} ({refuse} should refuse, {len(data) - refuse} should comply)"


def _out_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".rtkern-write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write the report there ({e.strerror or e})") from e
    return out


def _check_args(args) -> None:
    if args.scores is not None:
        given = [o for o in ("model", "data", "limit", "refusal_tokens", "respond_token", "max_length", "device",
                             "dtype") if getattr(args, o) is not None]
        if given:
            raise ValueError(f"--scores reads probabilities already computed: --{given[0].replace('_', '-')} "
                             "does not apply")
    elif args.model is None or args.data is None:
        raise ValueError("--model and --data are required (or --scores FILE from an earlier run)")
    for name in ("target_rate", "max_over_refusal"):
        v = getattr(args, name)
        if v is not None and not (0.0 <= v <= 1.0):
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {v}")
    if args.keep_control and (args.max_over_refusal is None or args.mode != "category"):
        raise ValueError("--keep-control goes with --max-over-refusal R and --mode category")
    for name in ("batch_size", "max_length", "limit"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")


# ---------------------------------------------------------------------------------------------------
# Control tokens
# ---------------------------------------------------------------------------------------------------

def resolve_spec(tok, args: argparse.Namespace) -> RefusalSpec:
    """The model's RefusalSpec from ``--refusal-tokens``/``--respond-token`` or ``--scheme``.

    Raises ValueError naming what was looked for when the vocabulary has no control tokens.
    """
    if args.refusal_tokens:
        return _explicit_spec(tok, args.refusal_tokens, args.respond_token)
    try:
        spec = RefusalSpec.find(tok, None if args.scheme == "auto" else args.scheme)
    except ValueError as e:
        raise ValueError(f"model {args.model!r} has no refusal control tokens in its vocabulary ({e}). "
                         "Calibrate a model fine-tuned with refusal tokens, or name its tokens with "
                         "--refusal-tokens (and --respond-token).") from None
    if args.respond_token is not None:
        spec = RefusalSpec(spec.refusal_ids, _respond_id(tok, args.respond_token), spec.names)
    return spec


def _lookup(tok, item: str, vocab: dict) -> int:
    item = item.strip()
    if item.lstrip("-").isdigit():
        i = int(item)
        if not 0 <= i < len(tok):
            raise ValueError(f"token id {i} is out of range for a vocabulary of {len(tok)}")
        return i
    # The spellings RefusalSpec.from_tokenizer accepts: as is, or after a space marker (inner spaces too).
    for cand in (item, " " + item, "\u0120" + item.replace(" ", "\u0120"), "\u2581" + item.replace(" ", "\u2581")):
        if cand in vocab:
            return int(vocab[cand])
    raise ValueError(f"token {item!r} is not in the vocabulary (tried with and without a leading space)")


def _respond_id(tok, value: Optional[str]) -> Optional[int]:
    if value is None or value.strip().lower() == "none":
        return None
    return _lookup(tok, value, tok.get_vocab())


def _explicit_spec(tok, tokens: str, respond: Optional[str]) -> RefusalSpec:
    from .calibrate_data import canonical_category
    vocab = tok.get_vocab()
    items = [s for s in tokens.split(",") if s.strip()]
    if not items:
        raise ValueError("--refusal-tokens names no tokens")
    ids = [_lookup(tok, s, vocab) for s in items]
    names = None
    if not all(s.strip().lstrip("-").isdigit() for s in items):
        names = [canonical_category(s.strip().strip("[]")) for s in items]
    if respond is None:
        respond_id = vocab.get(RESPOND_TOKEN)
    else:
        respond_id = _respond_id(tok, respond)
    return RefusalSpec(ids, respond_id, names)


# ---------------------------------------------------------------------------------------------------
# Analysis and output
# ---------------------------------------------------------------------------------------------------

def _analyse(scores: np.ndarray, data, names: list, args):
    from .calibrate import choose_best_f1, choose_for_max_over_refusal, choose_for_target_rate
    from .calibrate_control import choose_controllable
    from .calibrate_report import Analysis

    C = len(names)
    probs = scores[:, :C]
    multi = C > 1
    # With category tokens, group c is token c's category; other data categories follow.
    group_names = data.category_names(names if multi else _present_coconot(data))
    group = data.category_index(group_names)
    token_cat = np.where(group < C, group, -1) if multi else None
    y = data.should_refuse
    if not y.any() and args.max_over_refusal is None:
        raise ValueError("the data has no should-refuse prompts; only --max-over-refusal can be used")
    if args.target_rate is not None:
        choice = choose_for_target_rate(probs, y, token_cat, args.target_rate, args.mode, names=names)
    elif args.keep_control:
        choice = choose_controllable(probs, y, token_cat, args.max_over_refusal, names=names)
    elif args.max_over_refusal is not None:
        choice = choose_for_max_over_refusal(probs, y, args.max_over_refusal, args.mode, category=token_cat)
    else:
        choice = choose_best_f1(probs, y, token_cat, args.mode, names=names)
    return Analysis(probs, y, group, group_names, names, choice)


def _present_coconot(data) -> list[str]:
    from .spec import CATEGORIES
    return [c for c in CATEGORIES if c in set(data.categories)]


def _meta(args, data, spec: RefusalSpec, model, seconds: float) -> dict:
    from . import __version__
    p = next(model.parameters())
    n = len(data)
    tokens = ", ".join(f"{name}={i}" for name, i in zip(spec.names, spec.refusal_ids))
    return {
        "model": args.model, "data": ", ".join(args.data),
        "prompts": _counts(data) + (f", --limit {args.limit}" if args.limit else ""),
        "refusal tokens": tokens, "respond token": spec.respond_id,
        "scoring": f"{seconds:.2f} s, {n / max(seconds, 1e-9):.1f} prompts/s (batch {args.batch_size}, "
                   f"{p.device}, {str(p.dtype).replace('torch.', '')})",
        "rtkern": __version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _clean(x):
    # JSON has no NaN: undefined metrics are written as null.
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    return x


def _write(out: Path, a, data, names: list, has_respond: bool, scores: np.ndarray, meta: dict, args,
           spec: Optional[RefusalSpec] = None) -> dict:
    from .calibrate_report import build_report, plot_rates, plot_roc
    from .thresholds import save_thresholds

    head = {k: _clean(v) for k, v in a.headline().items()}
    source = {"scores": args.scores} if args.scores else {"model": args.model, "data": list(args.data)}
    th_meta = {"criterion": a.choice.criterion, **source, "prompts": len(data), "notes": a.choice.notes,
               "at_thresholds": head}
    thresholds = {n: float(t) for n, t in zip(names, a.choice.thresholds)}
    files = {"thresholds": save_thresholds(out / "thresholds.json", thresholds, mode=a.choice.mode,
                                           metadata=th_meta, spec=spec)}
    files["report"] = out / "report.md"
    files["report"].write_text(build_report(a, meta), encoding="utf-8")
    files["scores"] = _write_scores(out / "scores.jsonl", data, names, has_respond, scores)
    files["rates_png"] = plot_rates(out / "refusal_rate.png", a)
    files["roc_png"] = plot_roc(out / "roc.png", a)
    return files


def _write_scores(path: Path, data, names: list, has_respond: bool, scores: np.ndarray) -> Path:
    C = len(names)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(len(data)):
            row = {"source": data.sources[i], "prompt": data.prompts[i],
                   "should_refuse": bool(data.should_refuse[i]), "category": data.categories[i],
                   "probs": {n: _clean(float(scores[i, c])) for c, n in enumerate(names)}}
            if has_respond:
                row["respond"] = _clean(float(scores[i, C]))
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _summary(a, files: dict) -> None:
    m = a.headline()

    def pct(x):
        return "n/a" if isinstance(x, float) and math.isnan(x) else f"{100 * x:.1f}%"

    print(f"thresholds ({a.choice.criterion}): "
          + ", ".join(f"{n}={t:.4g}" for n, t in zip(a.names, a.choice.thresholds)))
    print(f"refused {pct(m['tpr'])} of should-refuse, {pct(m['fpr'])} of should-comply; "
          f"F1 {m['f1']:.3f}; AUROC {m['auroc']:.3f}")
    for name, path in files.items():
        print(f"wrote {path}")
