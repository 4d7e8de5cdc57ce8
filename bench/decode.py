"""Decode latency: rtkern's engine against Hugging Face ``generate`` and a gpt-fast-style compiled loop.

Every method generates ``new`` tokens for ``B`` prompts of ``prompt`` random token ids with the refusal
decision at the first position and control tokens masked afterwards (EOS ignored, so all rows run to
the end). ``ms/step`` = (t(new tokens) - t(1 token)) / (new - 1): the prefill and the first-token
decision cancel, leaving the steady decode step. Each t is the median of ``reps`` runs of the whole
call (which returns host values, so the device has finished), after one warm-up run of ``new`` tokens
(graph capture, compilation, cache allocation); the transformers baselines, slow and steady, take
``--baseline-reps``. Every rep is kept in the JSON; a point whose t(new) is not above t(1) is flagged.

==================  ====================================================================================
method              what runs
==================  ====================================================================================
``rtkern``          `rtkern.engine.Engine` (token-id prompts, no detokenising): static KV cache; on CUDA
                    each step is one CUDA-graph replay with the fused Triton sampler inside, plus the copy
                    of the sampled tokens into the output; on CPU eager with the PyTorch reference sampler
``rtkern-compile``  the same decode step through ``torch.compile`` before capture (CUDA only)
``rtkern-triton``   the engine with ``kernels="triton"``: the step on rtkern.fused_decode's Triton kernels
                    (GEMMs with RMSNorm, SwiGLU and residual add fused in, RoPE + cache write, split
                    decode attention; 5 launches per layer for SmolLM2, 7 for the 8B shape) inside the
                    same CUDA graph (CUDA only)
``gpt-fast``        our model, decode step ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) with
                    plain PyTorch sampling (control tokens masked, exponential-race multinomial) (CUDA only)
``hf-dynamic``      transformers ``generate`` (eager, DynamicCache) + `RefusalLogitsProcessor`
``hf-static``       the same with ``cache_implementation="static"``, eager (``disable_compile``: transformers
                    would otherwise compile a static-cache ``generate`` on CUDA by itself)
==================  ====================================================================================

Derived: ``tok/s`` = B / step; ``GB/s`` = bytes a step must read / step, counting every weight once
except an untied input embedding (a step gathers B of its rows) plus K and V of the mean context
(prompt + new / 2); ``floor_ms`` = those bytes / bandwidth; ``%bw`` = GB/s over the bandwidth, which is
the device-to-device copy bandwidth measured in the same run unless ``--bandwidth`` gives one. (The issue's
Llama-3-8B floor counts all 8.03 B parameters, 16.1 GB: 6% more than this convention's 15.0 GB.)

Run: ``rtkern bench decode --help``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from rtkern.argtypes import finite_float, int_at_least
from rtkern.spec import RefusalSpec

from .sampler import DTYPES, Unavailable, copy_bandwidth, environment

DEFAULT_OUT = Path("results") / "bench-decode"
METHODS = ("rtkern", "rtkern-compile", "rtkern-triton", "gpt-fast", "hf-dynamic", "hf-static")
GPU_METHODS = METHODS
CPU_METHODS = ("rtkern", "hf-dynamic", "hf-static")
RANDOM_SUFFIX = "-random"


@dataclass
class Row:
    model: str
    dtype: str
    batch: int
    method: str
    ms_per_step: Optional[float] = None
    tok_s: Optional[float] = None
    gbps: Optional[float] = None
    pct_bw: Optional[float] = None
    floor_ms: Optional[float] = None
    first_token_ms: Optional[float] = None   # the whole 1-token call: prefill, decision, host read
    status: str = "ok"
    error: Optional[str] = None
    warning: Optional[str] = None
    t1_ms: Optional[list] = None             # every timed rep of the 1-token and the new-token call
    tn_ms: Optional[list] = None


# -- model under test ----------------------------------------------------------------------------

def load_subject(name: str, device, dtype):
    """(model, tokenizer or None, spec). ``<config>-random`` builds random weights of a named shape."""
    from rtkern.loader import load_model
    from rtkern.model import ModelArgs, Transformer
    from rtkern.train.prepare import add_control_tokens

    if name.endswith(RANDOM_SUFFIX):
        args = ModelArgs.from_name(name[: -len(RANDOM_SUFFIX)])
        with torch.device("meta"):
            model = Transformer(args)
        model = model.to_empty(device=device).to(dtype)
        model = random_weights_(model)
        v = args.vocab_size
        spec = RefusalSpec(list(range(v - 6, v - 1)), respond_id=v - 1)  # reserved ids at the vocab's end
        return model.eval().requires_grad_(False), None, spec
    model, tok = load_model(name, device=device, dtype=dtype)
    ct = add_control_tokens(model, tok, "category")  # untrained rows: latency does not care
    return model.eval().requires_grad_(False), tok, RefusalSpec(ct.refusal_ids, ct.respond_id, ct.names)


def random_weights_(model):
    """Seeded random weights of a realistic scale (matrices N(0, 0.02), norms 1), in place; returns ``model``."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model


def step_bytes(model, batch: int, context: int) -> int:
    """Bytes one decode step must read: every weight once (the embedding only gathers rows) + the KV cache."""
    a = model.args
    seen, total = set(), 0
    for n, p in model.named_parameters():
        if p.data_ptr() in seen or (n == "embed_tokens.weight" and not a.tie_word_embeddings):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    elt = model.embed_tokens.weight.element_size()
    return total + batch * 2 * a.n_layers * a.n_kv_heads * context * a.head_dim * elt


# -- methods: each returns run(n_new) -> None -----------------------------------------------------

def _rtkern(model, tok, spec, prompts, variant: str):
    from rtkern.engine import Engine, SamplingParams
    if variant and not torch.cuda.is_available():
        raise Unavailable("needs CUDA")
    # no tokenizer: the prompts are ids and HF returns ids, so neither side pays for detokenising
    eng = Engine(model, None, spec, max_batch=len(prompts), compile=variant == "compile", check_every=1 << 30,
                 kernels="triton" if variant == "triton" else "torch")

    def run(n: int):
        eng.generate(prompts, SamplingParams(max_new_tokens=n, ignore_eos=True, temperature=1.0, seed=1))
    return run


def hf_view(model):
    """A transformers ``LlamaForCausalLM`` on the same weight tensors as our ``model`` (no copy)."""
    import transformers
    from rtkern.model import rtkern_to_hf_state_dict

    model.remove_cache()
    dev = model.embed_tokens.weight.device
    cfg = transformers.LlamaConfig(**model.args.to_hf_config())
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(cfg)
    # shared, not copied: the 8B shape would not fit twice next to its caches otherwise
    hf.load_state_dict(rtkern_to_hf_state_dict(model.state_dict()), strict=False, assign=True)
    hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg).to(dev)  # a buffer, left on meta above
    return hf.eval()


def _hf(model, spec, prompts, static: bool):
    from rtkern.adapters.hf import RefusalLogitsProcessor

    hf = hf_view(model)
    ids = torch.tensor(prompts, device=model.embed_tokens.weight.device)
    proc = RefusalLogitsProcessor(spec, thresholds=0.5)
    kw = dict(cache_implementation="static", disable_compile=True) if static else {}

    def run(n: int):
        proc.reset()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=True, temperature=1.0, top_k=0, top_p=1.0, logits_processor=[proc],
                          pad_token_id=0, **kw)
        out.cpu()  # host values, as every method returns: a generate that never syncs is still timed whole
    return run


def _gpt_fast(model, spec, prompts, max_new: int):
    if not torch.cuda.is_available():
        raise Unavailable("needs CUDA")
    dev = model.embed_tokens.weight.device
    B, T = len(prompts), len(prompts[0])
    ctl = torch.tensor(spec.control_ids, device=dev)

    def sample(logits):
        logits[:, ctl] = float("-inf")
        probs = torch.softmax(logits.float(), -1)
        return torch.argmax(probs / torch.empty_like(probs).exponential_(1), -1)

    def decode(tok, pos):
        return sample(model(tok[:, None], pos[:, None])[:, -1])

    # One static shape per compile, as gpt-fast runs: without the reset, the next batch size's recompile
    # would turn the shared code object dynamic in the batch dimension.
    torch._dynamo.reset()
    step = torch.compile(decode, mode="reduce-overhead", fullgraph=True, dynamic=False)
    ids = torch.tensor(prompts, device=dev)

    model.setup_cache(B, -(-(T + max_new) // 256) * 256)  # once: new cache tensors would recompile

    def run(n: int):
        tok = sample(model(ids, torch.arange(T, device=dev))[:, -1])
        pos = torch.full((B,), T, device=dev)
        out = [tok]
        for _ in range(n - 1):
            tok = step(tok.clone(), pos).clone()
            pos = pos + 1
            out.append(tok)
        torch.stack(out).cpu()
    return run


def build(method: str, model, tok, spec, prompts, max_new: int) -> Callable[[int], None]:
    if method in ("rtkern", "rtkern-compile", "rtkern-triton"):
        return _rtkern(model, tok, spec, prompts, method.partition("-")[2])
    if method in ("hf-dynamic", "hf-static"):
        return _hf(model, spec, prompts, method == "hf-static")
    if method == "gpt-fast":
        return _gpt_fast(model, spec, prompts, max_new)
    raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")


# -- timing -----------------------------------------------------------------------------------------

def _times_s(fn: Callable[[], None], reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def bench_point(model, tok, spec, name: str, dtype: str, batch: int, method: str, *, prompt: int, new: int,
                reps: int, bandwidth: float) -> Row:
    row = Row(name, dtype, batch, method)
    g = torch.Generator().manual_seed(batch)
    hi = min(model.args.vocab_size, min(spec.control_ids))  # prompts never contain control tokens
    prompts = torch.randint(0, hi, (batch, prompt), generator=g).tolist()
    try:
        run = build(method, model, tok, spec, prompts, new)
        run(new)  # warm-up: graph capture, compilation, autotuning, caches sized for `new`
        t1s, tns = [], []
        for _ in range(reps):  # alternating: drift (clocks, a busy machine) falls on both lengths alike
            t1s += _times_s(lambda: run(1), 1)
            tns += _times_s(lambda: run(new), 1)
    except Unavailable as e:
        row.status, row.error = "skipped", str(e)
        return row
    except Exception as e:  # noqa: BLE001  (a baseline failing, e.g. HF static + compile, is a result)
        row.status, row.error = "failed", f"{type(e).__name__}: {e}"[:300]
        return row
    t1, tn = statistics.median(t1s), statistics.median(tns)
    row.t1_ms, row.tn_ms = [round(t * 1e3, 4) for t in t1s], [round(t * 1e3, 4) for t in tns]
    if tn <= t1:
        row.warning = "t(new) <= t(1): the decode steps are lost in timing noise"
    step = (tn - t1) / (new - 1)
    nbytes = step_bytes(model, batch, prompt + new // 2)
    row.first_token_ms, row.floor_ms = t1 * 1e3, nbytes / bandwidth * 1e3
    if step > 0:  # else flagged above: no step time or rate to report (the raw times stay in t1_ms/tn_ms)
        row.ms_per_step, row.tok_s, row.gbps = step * 1e3, batch / step, nbytes / step / 1e9
        row.pct_bw = 100 * row.gbps * 1e9 / bandwidth
    return row


# -- report -----------------------------------------------------------------------------------------

def _f(x, spec):
    return "-" if x is None else format(x, spec)


def format_table(rows: Sequence[Row]) -> str:
    head = (f"{'model':28} {'dtype':5} {'B':>4} {'method':15} {'ms/step':>9} {'floor ms':>8} {'tok/s':>9} "
            f"{'GB/s':>8} {'%bw':>6} {'1-token ms':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        tail = f"  {r.status}: {r.error}" if r.status != "ok" else f"  ({r.warning})" if r.warning else ""
        lines.append(f"{r.model:28} {r.dtype:5} {r.batch:>4} {r.method:15} {_f(r.ms_per_step, '9.3f')} "
                     f"{_f(r.floor_ms, '8.3f')} {_f(r.tok_s, '9.1f')} {_f(r.gbps, '8.1f')} {_f(r.pct_bw, '6.1f')} "
                     f"{_f(r.first_token_ms, '10.1f')}{tail}")
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    models = sorted({(r.model, r.dtype) for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, (m, dt) in zip(axes[0], models):
        sub = [r for r in rows if r.model == m and r.dtype == dt and r.ms_per_step is not None]
        batches = sorted({r.batch for r in sub})
        methods = [x for x in METHODS if any(r.method == x for r in sub)]
        w = 0.8 / max(1, len(methods))
        for i, meth in enumerate(methods):
            vals = {r.batch: r.ms_per_step for r in sub if r.method == meth}
            ax.bar([j + i * w for j in range(len(batches))], [vals.get(b, 0) for b in batches], w, label=meth)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(batches))], [f"B={b}" for b in batches])
        ax.set_yscale("log")
        ax.set_ylabel("ms per decode step (lower is better)")
        ax.set_title(f"{m} ({dt})")
        if methods:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(models: Sequence[str], batches: Sequence[int], methods: Sequence[str], device, dtype: str, *,
        prompt: int, new: int, reps: int, baseline_reps: Optional[int] = None, bandwidth: Optional[float] = None,
        out_dir: Path, progress: bool = True, time_budget: Optional[float] = None) -> list[Row]:
    """Every (model, batch, method) point; the JSON and table are rewritten after each one, so a run cut
    short (a device call's time limit) keeps what it measured. Points past ``time_budget`` seconds are
    recorded as skipped."""
    from tqdm import tqdm
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    measured = bandwidth is None
    bandwidth = copy_bandwidth(device) if measured else bandwidth
    meta = {"env": environment(device), "prompt": prompt, "new_tokens": new, "reps": reps,
            "baseline_reps": baseline_reps or reps, "bandwidth": bandwidth,
            "bandwidth_source": "measured device copy" if measured else "--bandwidth", "argv": sys.argv}
    rows, t0 = [], time.monotonic()
    bar = tqdm(total=len(models) * len(batches) * len(methods), disable=not progress, desc="bench decode")
    for name in models:
        try:
            model, tok, spec = load_subject(name, device, DTYPES[dtype])
        except Exception as e:  # noqa: BLE001 - one model that cannot load must not cost the others
            model, error = None, f"{type(e).__name__}: {e}"[:300]
        for b in batches:
            for m in methods:
                bar.set_postfix_str(f"{name} B={b} {m}")
                if model is None:
                    row = Row(name, dtype, b, m, status="failed", error=f"loading the model: {error}")
                elif time_budget is not None and time.monotonic() - t0 > time_budget:
                    row = Row(name, dtype, b, m, status="skipped", error=f"past --time-budget {time_budget:g} s")
                else:
                    r = (baseline_reps or reps) if m.startswith("hf-") else reps
                    row = bench_point(model, tok, spec, name, dtype, b, m, prompt=prompt, new=new, reps=r,
                                      bandwidth=bandwidth)
                rows.append(row)
                _save(out_dir, meta, rows)
                bar.update()
        del model
    bar.close()
    print(format_table(rows))
    print(f"wrote {out_dir / 'decode.json'}, {out_dir / 'decode.md'} and {plot(rows, out_dir / 'decode.png')}")
    return rows


def _save(out_dir: Path, meta: dict, rows: Sequence[Row]) -> None:
    # After every point, the PNG too: a run stopped by a call's time limit keeps all three outputs.
    (out_dir / "decode.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    plot(rows, out_dir / "decode.png")
    bw = f"{meta['bandwidth'] / 1e12:.2f} TB/s ({meta['bandwidth_source']})"
    (out_dir / "decode.md").write_text(f"bandwidth {bw}\n\n```\n{format_table(rows)}\n```\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    p.add_argument("--model", nargs="+", default=None,
                   help="names/paths; '<shape>-random' = random weights, e.g. llama3-8b-random "
                        "(default: smollm2-135m-instruct, plus llama3-8b-random on CUDA)")
    p.add_argument("--batch", type=int_at_least(1), nargs="+", default=None,
                   help="batch sizes (default 1 8 32; CPU 1 8)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    p.add_argument("--prompt", type=int_at_least(1), default=128, help="prompt length in tokens")
    p.add_argument("--new", type=int_at_least(2), default=None,
                   help="new tokens per request, at least 2: ms/step is a difference of two lengths "
                        "(default 256; CPU 16)")
    p.add_argument("--reps", type=int_at_least(1), default=None,
                   help="timed runs per point (median; default 5, CPU 3)")
    p.add_argument("--baseline-reps", type=int_at_least(1), default=None,
                   help="timed runs per point of the transformers baselines (default: --reps, at most 3)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--bandwidth", type=finite_float(0.0, strict=True), default=None,
                   help="bytes/s for floor_ms and %%bw (default: the device copy bandwidth, measured in the run)")
    p.add_argument("--time-budget", type=finite_float(0.0, strict=True), default=None,
                   help="seconds; points not started by then are recorded as skipped (fit a time-limited call)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-progress", action="store_true")


def run_from_args(args: argparse.Namespace) -> int:
    cuda = torch.device(args.device).type == "cuda"
    models = args.model or (["smollm2-135m-instruct", "llama3-8b-random"] if cuda else ["smollm2-135m-instruct"])
    new = (256 if cuda else 16) if args.new is None else args.new
    reps = (5 if cuda else 3) if args.reps is None else args.reps
    batches = ([1, 8, 32] if cuda else [1, 8]) if args.batch is None else args.batch
    if new < 2 or reps < 1 or min(batches, default=0) < 1:   # the parser checks these; run_from_args may get a Namespace
        raise SystemExit("--new must be at least 2 (ms/step is a difference of two lengths), --reps and "
                         "--batch at least 1")
    run(models, batches, args.methods or (GPU_METHODS if cuda else CPU_METHODS),
        torch.device(args.device), args.dtype, prompt=args.prompt, new=new, reps=reps,
        baseline_reps=args.baseline_reps or min(reps, 3), bandwidth=args.bandwidth, out_dir=args.out,
        progress=not args.no_progress, time_budget=args.time_budget)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="rtkern bench decode", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
