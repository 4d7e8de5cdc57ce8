"""``rtkern generate``: answer prompts with refusal control and show the first-token refusal probabilities."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="user messages (rendered with the chat template)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="checkpoint dir, .gguf file or embedded name")
    p.add_argument("--thresholds", nargs="+", default=["0.5"], metavar="T",
                   help="one number for every category, NAME=VALUE pairs, or a thresholds JSON file "
                        "(from rtkern calibrate); a value above 1 switches a category off")
    p.add_argument("--mode", choices=("category", "sum", "free"), default=None,
                   help="first-token decision rule (default: the thresholds file's, else category)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--stop", nargs="*", default=(), help="stop strings")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--add-control-tokens", choices=("single", "category"), default=None,
                   help="add untrained control tokens to a model that has none (to try the plumbing, "
                        "not to get meaningful refusals)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def parse_thresholds(values, spec):
    """``--thresholds`` values -> (thresholds for SamplingParams, mode from a file or None)."""
    from .thresholds import load_thresholds
    if len(values) == 1 and Path(values[0]).is_file():
        th = load_thresholds(values[0], spec)
        return th.tensor(spec).tolist(), th.mode
    if len(values) == 1 and "=" not in values[0]:
        return _number(values[0], "--thresholds"), None
    pairs = {}
    for v in values:
        name, sep, val = v.rpartition("=")
        if not sep or not name:
            raise ValueError(f"--thresholds takes one number, a file, or NAME=VALUE pairs; got {v!r}")
        pairs[name] = _number(val, f"--thresholds {name}")
    return pairs, None


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number or an existing file, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
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
    engine = Engine(model, tok, spec, max_batch=min(32, len(args.prompts)))
    thresholds, file_mode = parse_thresholds(args.thresholds, engine.spec)
    params = SamplingParams(thresholds=thresholds, mode=args.mode or file_mode or "category",
                            temperature=args.temperature, seed=args.seed, max_new_tokens=args.max_new_tokens,
                            stop=tuple(args.stop))
    for prompt, r in zip(args.prompts, engine.generate(args.prompts, params)):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": r.text, "refused": r.refused, "category": r.category,
                              "refusal_probs": r.refusal_probs, "finish_reason": r.finish_reason,
                              "tokens": r.tokens}))
            continue
        verdict = f"REFUSED ({r.category})" if r.refused >= 0 else ("answered" if r.refused == -1 else "invalid logits")
        probs = "  ".join(f"{k}={v:.4f}" for k, v in r.refusal_probs.items())
        print(f">>> {prompt}\n[{verdict}] first-token p: {probs}\n{r.text}\n")
    return 0
