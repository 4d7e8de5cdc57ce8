"""``rtkern generate``: answer prompts with refusal control and show the first-token refusal probabilities."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from .argtypes import finite_float, int64, int_at_least

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_THRESHOLD = 0.5
PROG = "rtkern generate"


# ---------------------------------------------------------------------------------------------------
# Argument types: checked while parsing, before any model is loaded (argparse exits with status 2)
# ---------------------------------------------------------------------------------------------------

def _stop(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("a stop string must not be empty")
    return text


def _device(text: str) -> torch.device:
    try:
        d = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"invalid device {text!r} ({e})") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} requested but CUDA is not available")
    return d


def _threshold_value(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
    if math.isnan(v) or v < 0:
        raise argparse.ArgumentTypeError(f"{what} must be >= 0 (above 1 switches a category off), got {text!r}")
    return v


def threshold_arg(text: str):
    """One ``--thresholds`` token -> a number, a ``{name: value}`` dict, or a loaded `thresholds.Thresholds`.

    Accepted: an existing thresholds JSON file, one number for every category, or ``NAME=VALUE`` pairs
    separated by commas (``"Humanizing requests=1.1,Requests with safety concerns=0.2"``).
    """
    if Path(text).is_file():
        from .thresholds import load_thresholds
        try:
            return load_thresholds(text)     # category names are checked once the model is loaded
        except (ValueError, OSError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    if "=" not in text:
        try:
            float(text)
        except ValueError:
            hint = "no such file, and not " if text.endswith(".json") or "/" in text else "expected "
            raise argparse.ArgumentTypeError(
                f"{hint}a number, comma-separated NAME=VALUE pairs or an existing thresholds file: {text!r}") from None
        return _threshold_value(text, "a threshold")
    pairs = {}
    for item in text.split(","):
        name, sep, val = item.rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated NAME=VALUE pairs, got {item.strip()!r} in {text!r}")
        pairs[name] = _threshold_value(val.strip(), f"the threshold of {name!r}")
    return pairs


class _ThresholdsAction(argparse.Action):
    """``--thresholds`` may be repeated to add NAME=VALUE pairs; a number or a file must come alone."""

    def __call__(self, parser, namespace, value, option_string=None):
        prev = getattr(namespace, self.dest, None)
        if prev is None:
            setattr(namespace, self.dest, value)
        elif isinstance(prev, dict) and isinstance(value, dict):
            setattr(namespace, self.dest, {**prev, **value})
        else:
            parser.error(f"argument {option_string}: given more than once; only NAME=VALUE pairs can be combined "
                         "(one number or one file must be the only --thresholds)")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="user messages (rendered with the chat template)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="checkpoint dir, .gguf file or embedded name")
    p.add_argument("--thresholds", type=threshold_arg, action=_ThresholdsAction, default=None, metavar="T",
                   help=f"one number for every category (default {DEFAULT_THRESHOLD}), comma-separated "
                        "NAME=VALUE pairs (the option may be repeated), or a thresholds JSON file (from "
                        "rtkern calibrate); a value above 1 switches a category off")
    p.add_argument("--mode", choices=("category", "sum", "free"), default=None,
                   help="first-token decision rule (default: the thresholds file's, else category)")
    p.add_argument("--temperature", type=finite_float(0.0, note=" (0 = greedy)"), default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int64, default=0)
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=256)
    p.add_argument("--stop", type=_stop, action="append", default=[], metavar="S",
                   help="stop string (repeat the option for several)")
    p.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--add-control-tokens", choices=("single", "category"), default=None,
                   help="add untrained control tokens to a model that has none (to try the plumbing, "
                        "not to get meaningful refusals)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def parse_thresholds(value, spec):
    """A parsed ``--thresholds`` value (see `threshold_arg`) -> thresholds for SamplingParams (a loaded
    file passes through: SamplingParams takes its mode unless ``--mode`` is given).

    Raises ValueError when the value names categories the model's spec lacks.
    """
    if value is None:
        return DEFAULT_THRESHOLD
    if isinstance(value, str):
        value = threshold_arg(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        unknown = [k for k in value if k not in spec.names]
        if unknown:
            raise ValueError(f"--thresholds names unknown categor{'ies' if len(unknown) > 1 else 'y'} {unknown}; "
                             f"this model's categories: {list(spec.names)}")
        return dict(value)
    value.tensor(spec)  # names the file's categories this model lacks
    return value


# ---------------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    try:
        engine, params = _setup(args)
        results = engine.generate(args.prompts, params)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    for prompt, r in zip(args.prompts, results):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": r.text, "refused": r.refused, "category": r.category,
                              "refusal_probs": r.refusal_probs, "finish_reason": r.finish_reason,
                              "tokens": r.tokens}))
            continue
        verdict = f"REFUSED ({r.category})" if r.refused >= 0 else ("answered" if r.refused == -1 else "invalid logits")
        probs = "  ".join(f"{k}={v:.4f}" for k, v in r.refusal_probs.items())
        print(f">>> {prompt}\n[{verdict}] first-token p: {probs}\n{r.text}\n")
    return 0


def _setup(args: argparse.Namespace):
    from .engine import Engine, SamplingParams
    from .loader import load_model
    from .spec import RefusalSpec

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, tok = load_model(args.model, device=device, dtype=dtype)
    spec = None
    if args.add_control_tokens:
        from .train.prepare import add_control_tokens
        ct = add_control_tokens(model, tok, args.add_control_tokens)
        spec = RefusalSpec(ct.refusal_ids, ct.respond_id, ct.names)
    try:
        engine = Engine(model, tok, spec, max_batch=min(32, len(args.prompts)))
    except ValueError:
        if spec is None and not _has_control_tokens(tok):
            raise ValueError(f"{args.model} has no refusal control tokens; pass --add-control-tokens single "
                             "(or category) to add untrained ones (this tries the plumbing; the refusals are "
                             "not meaningful), or use a checkpoint trained with them (rtkern train)") from None
        raise
    params = SamplingParams(thresholds=parse_thresholds(args.thresholds, engine.spec), mode=args.mode,
                            temperature=args.temperature, seed=args.seed, max_new_tokens=args.max_new_tokens,
                            stop=tuple(args.stop))
    return engine, params


def _has_control_tokens(tok) -> bool:
    from .spec import RefusalSpec
    try:
        RefusalSpec.find(tok)
        return True
    except ValueError:
        return False
