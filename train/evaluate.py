"""First-token refusal rates at the model's own (argmax) decision: what a fine-tune learned, no thresholds.

    python -m rtkern.train.evaluate --model runs/x/final --data ../shared/data/coconot

Each prompt gets one greedy token in ``free`` mode (the sampler applies no threshold and masks nothing),
so a prompt counts as refused exactly when the most likely first token is a refusal token.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from typing import Optional, Sequence

ALL = "all"


def argmax_refusals(engine, prompts: Sequence[str], batch_size: int = 32) -> list[int]:
    """Refused category per prompt (-1 answered) from the greedy first token; ``engine``: rtkern Engine."""
    from ..engine import SamplingParams
    params = SamplingParams(mode="free", temperature=0.0, max_new_tokens=1)
    out = []
    for lo in range(0, len(prompts), batch_size):
        out += [r.refused for r in engine.generate(list(prompts[lo:lo + batch_size]), params)]
    return out


def rate_table(refused: Sequence[int], should_refuse: Sequence[bool], categories: Sequence[Optional[str]]
               ) -> dict[tuple[str, str], tuple[int, float]]:
    """{(set, category): (prompts, refused fraction)}; set is "original" (should refuse) or "contrast"."""
    groups = defaultdict(list)
    for r, s, c in zip(refused, should_refuse, categories):
        key = "original" if s else "contrast"
        groups[(key, c or "uncategorised")].append(r >= 0)
        groups[(key, ALL)].append(r >= 0)
    return {k: (len(v), sum(v) / len(v)) for k, v in sorted(groups.items())}


def markdown(table) -> str:
    lines = ["| set | category | prompts | refused (argmax) |", "|---|---|---|---|"]
    lines += [f"| {s} | {c} | {n} | {100 * f:.1f}% |" for (s, c), (n, f) in table.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    from ..calibrate_data import load_labelled
    from ..engine import Engine
    from ..loader import load_model

    p = argparse.ArgumentParser(prog="python -m rtkern.train.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="CoCoNot folder or labelled CSV/JSONL (as rtkern calibrate)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    model, tok = load_model(args.model, device=args.device)
    data = load_labelled(args.data)
    engine = Engine(model, tok, max_batch=args.batch_size)
    refused = argmax_refusals(engine, data.prompts, args.batch_size)
    print(markdown(rate_table(refused, data.should_refuse.tolist(), data.categories)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
