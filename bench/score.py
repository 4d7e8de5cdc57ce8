"""Scoring throughput: ``rtkern.scoring.score`` against the Hugging Face forward loop a user would write.

Both compute the first-token probability of every control token for the same prompts, ``--batch-size``
prompts per forward pass, on the same weight tensors:

=================  ======================================================================================
method             what runs
=================  ======================================================================================
``rtkern``         `rtkern.scoring.score`: every prompt rendered, then tokenized in one batch; prompts
                   sorted by length into chunks, right-padded, the LM head only on each row's last real
                   position, `rtkern.refusal_probs` on those logits
``rtkern-graphs``  (CUDA only) a kept `rtkern.scoring.Scorer` with ``cuda_graphs=True``: the same, each
                   chunk padded to the batch size and a multiple of 32 tokens and replayed from the CUDA
                   graph of that shape (captured in the untimed warm-up pass)
``hf-loop``        transformers ``LlamaForCausalLM`` (its default attention) over the prompts in their
                   given order, each chunk tokenized by the fast tokenizer's batched
                   ``apply_chat_template``, right-padded with an attention mask, full ``[B, T, V]``
                   logits, the last real position's float32 softmax, the control columns gathered
=================  ======================================================================================

``prompts/s`` is the median over ``--reps`` full passes (the first pass, untimed, warms up);
``speedup`` is relative to ``hf-loop`` with the same ``tokenize``: ``timed`` renders and tokenizes every
prompt in each pass, each method its own way (what a user waits for), ``cached`` does it once before
timing (the model's share alone: on a GPU the tokenizer would otherwise weigh on both); ``max|dp|`` is the largest
probability difference from ``hf-loop`` (both compute the same numbers). Prompts: the CoCoNot eval set
when ``--data`` names it (or a CSV/JSONL with a prompt column), else ``--num-prompts`` synthetic prompts
of 5-120 words.

Run: ``rtkern bench score --help``.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from rtkern.argtypes import int_at_least
from rtkern.scoring import Scorer, score
from rtkern.spec import RefusalSpec

from .decode import hf_view, load_subject
from .sampler import DTYPES, environment

DEFAULT_OUT = Path("results") / "bench-score"
METHODS = ("rtkern", "rtkern-graphs", "hf-loop")
_WORDS = ("how do i make the best pasta sauce for a dinner party tonight please explain each step and why "
          "what is the capital of a country nobody has heard of write me a poem about the sea").split()


@dataclass
class Row:
    method: str
    batch_size: int
    prompts: int
    tokenize: str = "timed"
    seconds: Optional[float] = None
    prompts_s: Optional[float] = None
    speedup: Optional[float] = None
    max_dp: Optional[float] = None
    error: Optional[str] = None


def synthetic_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 120))) for _ in range(n)]


def hf_loop(hf, render: Callable, prompts: Sequence[str], spec: RefusalSpec, batch_size: int) -> torch.Tensor:
    """``[N, len(control_ids)]`` float32 probabilities, the plain way: full logits, softmax, gather.

    ``render`` maps a chunk's conversations to their token id lists (`hf_chat`, or a cache).
    """
    dev, ctl = hf.device, torch.tensor(spec.control_ids)
    out = []
    with torch.inference_mode():
        for lo in range(0, len(prompts), batch_size):
            rows = render([[{"role": "user", "content": p}] for p in prompts[lo:lo + batch_size]])
            T = max(map(len, rows))
            ids = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=dev)
            mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows], device=dev)
            logits = hf(input_ids=ids, attention_mask=mask).logits
            last = logits[torch.arange(len(rows), device=dev), mask.sum(1) - 1].float()
            out.append(torch.softmax(last, -1)[:, ctl.to(dev)].cpu())
    return torch.cat(out)


def hf_chat(tok) -> Callable:
    """What a transformers loop calls per chunk: the fast tokenizer's batched ``apply_chat_template``."""
    fast = getattr(tok, "hf_tokenizer", None)
    if fast is None:  # a sentencepiece-only checkpoint has none: rtkern's rendering, prompt by prompt
        return lambda convs: [tok.apply_chat_template(m, add_generation_prompt=True) for m in convs]

    def render(convs):
        out = fast.apply_chat_template(convs, add_generation_prompt=True)
        return [list(r) for r in (out["input_ids"] if hasattr(out, "keys") else out)]  # a dict since 5.0
    return render


class CachedChat:
    """A tokenizer whose chat rendering of each prompt is computed once and then looked up."""

    def __init__(self, tok):
        self.tok, self.cache = tok, {}

    def apply_chat_template(self, messages, add_generation_prompt=True):
        key = (repr(messages), add_generation_prompt)
        if key not in self.cache:
            self.cache[key] = list(self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))
        return self.cache[key]

    def apply_chat_template_batch(self, conversations, add_generation_prompt=True):
        return [self.apply_chat_template(m, add_generation_prompt) for m in conversations]

    def __getattr__(self, name):
        return getattr(self.tok, name)


def _timed(fn: Callable[[], torch.Tensor], reps: int, device) -> tuple[float, torch.Tensor]:
    res = fn()  # warm-up
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        res = fn()   # returns CPU tensors: the device has finished
        times.append(time.perf_counter() - t)
    return statistics.median(times), res


def run(model_name: str, prompts: Sequence[str], batch_sizes: Sequence[int], device, dtype: str, reps: int,
        out_dir: Path) -> list[Row]:
    model, tok, spec = load_subject(model_name, device, DTYPES[dtype])
    if tok is None:
        raise SystemExit("bench score needs a model with a tokenizer (not a '-random' shape)")
    hf = hf_view(model)
    rows = []
    n = len(prompts)
    for bs in batch_sizes:
        cached = CachedChat(tok)  # the warm-up pass fills it
        for mode, render, t in (("timed", hf_chat(tok), tok), ("cached", cached.apply_chat_template_batch, cached)):
            t_hf, p_hf = _timed(lambda: hf_loop(hf, render, prompts, spec, bs), reps, device)
            rows.append(Row("hf-loop", bs, n, mode, t_hf, n / t_hf, 1.0, 0.0))
            for method, fn in _rtkern_methods(model, t, prompts, spec, bs, device):
                t_rt, p_rt = _timed(fn, reps, device)
                rows.append(Row(method, bs, n, mode, t_rt, n / t_rt, t_hf / t_rt, float((p_rt - p_hf).abs().max())))
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"env": environment(device), "model": model_name, "dtype": dtype, "reps": reps, "argv": sys.argv}
    (out_dir / "score.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    return rows


def _rtkern_methods(model, tok, prompts, spec, bs, device):
    yield "rtkern", lambda: score(model, tok, prompts, spec, batch_size=bs, progress=False)
    if device.type == "cuda":
        scorer = Scorer(model, tok, spec, batch_size=bs, cuda_graphs=True)   # the warm-up pass captures
        yield "rtkern-graphs", lambda: scorer(prompts, progress=False)


def format_table(rows: Sequence[Row]) -> str:
    lines = ["| batch | tokenize | method | prompts | s | prompts/s | speedup | max abs dp |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.batch_size} | {r.tokenize} | {r.method} | {r.prompts} | {r.seconds:.3f} | {r.prompts_s:.1f} | "
              f"{r.speedup:.2f}x | {r.max_dp:.1e} |" for r in rows]
    return "\n".join(lines)


def _prompts(data: Optional[str], n: int) -> list[str]:
    if data is None:
        return synthetic_prompts(n)
    from rtkern.calibrate_data import load_labelled
    return list(load_labelled(data).prompts)[:n]


def add_arguments(p: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    p.add_argument("--model", default="smollm2-135m-instruct", help="name or path (needs a tokenizer)")
    p.add_argument("--data", default=None, help="CoCoNot folder or CSV/JSONL (default: synthetic prompts)")
    p.add_argument("--num-prompts", type=int_at_least(1), default=None, help="prompts to score (default 663; CPU 64)")
    p.add_argument("--batch-size", type=int_at_least(1), nargs="+", default=None, help="default 16 64; CPU 16")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    p.add_argument("--reps", type=int_at_least(1), default=None, help="timed passes per point (median; default 5, CPU 1)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)


def run_from_args(a: argparse.Namespace) -> int:
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    n = (663 if cuda else 64) if a.num_prompts is None else a.num_prompts
    batches = ([16, 64] if cuda else [16]) if a.batch_size is None else a.batch_size
    reps = (5 if cuda else 1) if a.reps is None else a.reps
    if n < 1 or reps < 1 or min(batches, default=0) < 1:   # the parser checks these; run_from_args may get a Namespace
        raise SystemExit("--num-prompts, --batch-size and --reps must be positive")
    rows = run(a.model, _prompts(a.data, n), batches, device, a.dtype, reps, a.out)
    table = format_table(rows)
    (a.out / "score.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {a.out / 'score.json'} and {a.out / 'score.md'}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="rtkern bench score", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
