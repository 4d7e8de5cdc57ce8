"""Benchmark of the fused refusal sampler against the baselines a user would otherwise run.

Methods (each built by `build_method` into a zero-argument callable, so the same code serves the
table-printing runner `run` / `main` and the pytest-benchmark suite `bench/test_bench_sampler.py`):

==========================  =====  ==========================================================================
name                        kind   what is timed
==========================  =====  ==========================================================================
``naive``                   eager  `naive_refusal_sample`: float() -> softmax -> gather -> threshold -> mask
                                   -> multinomial / argmax, plain PyTorch
``naive-graph``             graph  the same, captured once in a ``torch.cuda.CUDAGraph``; ``g.replay()``
``naive-compile``           eager  ``torch.compile`` of the same (default mode, no CUDA graphs)
``flashinfer``              eager  ``flashinfer.sampling.sampling_from_logits`` (plain sampling, no refusal
                                   logic: a lower bound for "any sampler at all"), when importable
``flashinfer-graph``        graph  the same inside a CUDA graph
``rtkern-triton``           eager  ``rtkern.refusal_sample(..., backend="triton")`` including Python dispatch
``rtkern-triton-graph``     graph  the same captured with ``out=`` preallocated outputs; ``g.replay()``
``rtkern-torch``            eager  ``rtkern.refusal_sample(..., backend="torch")`` (the reference; CPU path)
==========================  =====  ==========================================================================

Timing: on CUDA ``triton.testing.do_bench`` (median, L2 flushed between calls) gives ``us``, the device
time per call; for eager methods it hides the host launch cost behind the cache flush, so ``wall_us``
(back-to-back calls, one synchronisation at the end, divided by the count) is reported beside it and
includes the Python/launch overhead. On the CPU both are the median of ``perf_counter`` over a few calls.

Derived columns: ``gbps`` = B*V*elt / us (effective logits bandwidth), ``floor_us`` = B*V*elt /
``bandwidth`` (the time to read the logits once; the device copy bandwidth measured in the run unless
``--bandwidth`` gives one: 3.02e12 B/s on the H100 SXM), and
``x_floor`` = us / floor_us.

Checks: every method that returns refusal probabilities is compared with
`rtkern.reference.refusal_probs_reference` (``max_prob_err``) and its ``refused`` decisions with the
reference sampler's (``decisions_match``, fraction of rows); the timing inputs use ``category`` mode on
every row, where decisions do not depend on the random draw.

Run: ``rtkern bench sampler --help`` or ``python -m rtkern.bench.sampler --help``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from rtkern import RefusalControls, RefusalSpec, SampleOutput, refusal_sample, unpack_vocab_mask
from rtkern.argtypes import finite_float, int_at_least
from rtkern.reference import refusal_probs_reference, sample_reference

H100_BANDWIDTH = 3.02e12  # bytes/s, H100 SXM (HBM3) device-to-device copy bandwidth
DEFAULT_OUT = Path("results") / "bench-sampler"

GPU_BATCHES = (1, 8, 32, 128, 256)
GPU_VOCABS = (49152, 128256)
GPU_DTYPES = ("bf16", "fp32")
CPU_BATCHES = (1, 8)
CPU_VOCABS = (49152,)
CPU_DTYPES = ("fp32",)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

METHODS = ("naive", "naive-graph", "naive-compile", "flashinfer", "flashinfer-graph",
           "rtkern-triton", "rtkern-triton-graph", "rtkern-torch")
GPU_DEFAULT_METHODS = ("naive", "naive-graph", "naive-compile", "flashinfer", "flashinfer-graph",
                       "rtkern-triton", "rtkern-triton-graph")
CPU_DEFAULT_METHODS = ("naive", "rtkern-torch")


class Unavailable(RuntimeError):
    """A method that cannot run here (no CUDA, no flashinfer, ...): reported as skipped, not failed."""


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------

def make_spec(vocab: int, categories: int = 5, respond: bool = True) -> RefusalSpec:
    """Control tokens at the end of the vocabulary, where added tokens usually go."""
    n = categories + (1 if respond else 0)
    if vocab < n + 1:
        raise ValueError(f"vocab must be larger than the {n} control tokens, got {vocab}")
    ids = list(range(vocab - n, vocab))
    return RefusalSpec(ids[:categories], ids[categories] if respond else None)


def make_inputs(batch: int, vocab: int, dtype: torch.dtype, device, *, categories: int = 5,
                respond: bool = True, temperature: float = 1.0, threshold: float = 0.3, seed: int = 0):
    """Random logits ``[batch, vocab]`` with refusal logits spread so that decisions vary by row.

    Even rows are first-step rows (the refusal decision), odd rows later decode steps; every row uses
    ``category`` mode. Returns ``(logits, spec, controls)``.
    """
    device = torch.device(device)
    spec = make_spec(vocab, categories, respond)
    gen = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(batch, vocab, generator=gen, device=device, dtype=torch.float32) * 3.0
    # log-normaliser of N(0, 9) logits is ~ log(V) + 4.5; spread the refusal logits around it.
    lse = math.log(vocab) + 4.5
    rid = torch.tensor(spec.refusal_ids, device=device)
    z[:, rid] = lse - 8.0 + torch.rand(batch, categories, generator=gen, device=device) * 12.0
    logits = z.to(dtype)
    rows = torch.arange(batch, device=device)
    # Every control is passed as a full-size tensor: at B=1, `build` broadcasts scalars to stride-0
    # tensors that `refusal_sample`'s contiguity check rejects.
    controls = RefusalControls.build(
        batch, categories, device, thresholds=torch.full((batch, categories), threshold, device=device),
        logit_bias=torch.zeros(batch, categories, device=device), mode=torch.zeros(batch, dtype=torch.int32, device=device),
        temperature=torch.full((batch,), float(temperature), device=device), first_step=(rows % 2 == 0),
        seed=rows.to(torch.int64) + 1000 * seed, position=torch.zeros(batch, dtype=torch.int64, device=device))
    return logits, spec, controls


# --------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------

_ID_CACHE: dict = {}


def _control_ids(spec: RefusalSpec, device) -> torch.Tensor:
    key = (spec.control_ids, str(torch.device(device)))
    t = _ID_CACHE.get(key)
    if t is None:
        t = _ID_CACHE[key] = torch.tensor(spec.control_ids, dtype=torch.int64, device=device)
    return t


def _naive_core(logits: torch.Tensor, ctl: torch.Tensor, num_refusal: int, respond_id: Optional[int],
                thresholds: torch.Tensor, logit_bias: torch.Tensor, mode: torch.Tensor,
                temperature: torch.Tensor, first_step: torch.Tensor,
                vocab_mask: Optional[torch.Tensor], draw: str = "multinomial") -> SampleOutput:
    rid = ctl[:num_refusal]
    z = logits.to(torch.float32, copy=True)                  # pass 1: fp32 copy of the logits
    z[:, rid] += logit_bias
    probs = torch.softmax(z, dim=-1)                         # passes 2-3
    p = probs[:, rid]                                        # [B, C] refusal probabilities
    passing = p >= thresholds
    refuse = first_step & (((mode == 0) & passing.any(1)) | ((mode == 1) & (p.sum(1) >= thresholds[:, 0])))
    best = torch.where(mode == 0, torch.where(passing, p, -1.0).argmax(1), p.argmax(1))
    # Control tokens are sampled only on first-step "free" rows.
    free_first = first_step & (mode == 2)
    z[:, ctl] = torch.where(free_first[:, None], z[:, ctl], float("-inf"))
    if vocab_mask is not None:
        allowed = unpack_vocab_mask(vocab_mask, z.shape[1])
        allowed[:, ctl] = True
        z = z.masked_fill(~allowed, float("-inf"))
    greedy = z.argmax(1)
    t = torch.where(temperature > 0, temperature, 1.0)
    probs_t = torch.softmax(z / t[:, None], dim=-1)
    if draw == "multinomial":
        sampled = torch.multinomial(probs_t, 1).squeeze(1)
    else:  # exponential race: what multinomial(n=1) computes, minus its validity checks
        sampled = (probs_t / torch.empty_like(probs_t).exponential_()).argmax(1)
    tok = torch.where(temperature > 0, sampled, greedy)
    if respond_id is not None:
        tok = torch.where(first_step & (mode != 2) & ~refuse, respond_id, tok)
    tok = torch.where(refuse, rid[best], tok)
    drawn = tok[:, None] == rid[None, :]
    refused = torch.where(refuse, best, torch.where(free_first & drawn.any(1), drawn.int().argmax(1), -1))
    return SampleOutput(tok, p, refused.to(torch.int32))


def naive_refusal_sample(logits: torch.Tensor, spec: RefusalSpec, controls: RefusalControls, *,
                         draw: str = "multinomial") -> SampleOutput:
    """The refusal sampler as a user would write it in eager PyTorch (README "Semantics", rules 1-4).

    float() -> (+bias) -> softmax -> gather refusal probabilities -> threshold -> mask control tokens
    (and ``vocab_mask``) -> multinomial at the row's temperature, or argmax at temperature 0.
    Several full passes over ``[B, V]`` and torch's own RNG (not keyed by seed/position); invalid rows
    (NaN/+inf) are not handled (rule 5). ``draw="exponential"`` replaces ``torch.multinomial`` by the
    exponential race it runs internally (same distribution), for torch versions whose multinomial
    validates its input with a host synchronisation and so cannot be captured in a CUDA graph.
    """
    return _naive_core(logits, _control_ids(spec, logits.device), spec.num_categories, spec.respond_id,
                       controls.thresholds, controls.logit_bias, controls.mode, controls.temperature,
                       controls.first_step, controls.vocab_mask, draw)


def compiled_naive(mode: str = "default") -> Callable:
    """``torch.compile`` of the naive sampler (static shapes; one compilation per grid point)."""
    import torch._dynamo.config as dcfg

    name = "recompile_limit" if hasattr(dcfg, "recompile_limit") else "cache_size_limit"
    setattr(dcfg, name, max(getattr(dcfg, name), 64))  # the bench grid has 20 shapes
    core = torch.compile(_naive_core, mode=None if mode == "default" else mode, dynamic=False)

    def fn(logits, spec, controls):
        return core(logits, _control_ids(spec, logits.device), spec.num_categories, spec.respond_id,
                    controls.thresholds, controls.logit_bias, controls.mode, controls.temperature,
                    controls.first_step, controls.vocab_mask)
    return fn


def flashinfer_sample(logits: torch.Tensor, spec: RefusalSpec, controls: RefusalControls) -> torch.Tensor:
    """FlashInfer's fused plain sampling (temperature 1, no refusal logic, no masking): tokens only."""
    try:
        from flashinfer.sampling import sampling_from_logits
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        raise Unavailable(f"flashinfer not importable ({type(e).__name__}: {e})") from None
    return sampling_from_logits(logits)


def rtkern_triton(logits, spec, controls, out=None) -> SampleOutput:
    return refusal_sample(logits, spec, controls, out=out, backend="triton")


def rtkern_torch(logits, spec, controls, out=None) -> SampleOutput:
    return refusal_sample(logits, spec, controls, out=out, backend="torch")


# --------------------------------------------------------------------------------------------------
# Method construction
# --------------------------------------------------------------------------------------------------

def _syncs(fn: Callable[[], object]) -> bool:
    """True when ``fn`` makes the host wait on the device (which CUDA-graph capture forbids)."""
    fn()  # first call: caches, allocator warm-up
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return False
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode(old)
        torch.cuda.synchronize()


def _capture(fn: Callable[[], object], warmup: int = 3):
    """Warm ``fn`` up on a side stream, capture it in a CUDA graph; returns (graph, static result)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        res = fn()
    torch.cuda.synchronize()
    return g, res


@dataclass
class Built:
    """A ready-to-time method: ``call()`` does one sampler step; ``result()`` reads its last output."""

    call: Callable[[], object]
    result: Callable[[], object]
    kind: str  # "eager" or "graph"
    keep: list = field(default_factory=list)  # graphs and buffers that must outlive the timing
    note: Optional[str] = None


def method_kind(name: str) -> str:
    return "graph" if name.endswith("-graph") else "eager"


def build_method(name: str, logits: torch.Tensor, spec: RefusalSpec, controls: RefusalControls, *,
                 compile_mode: str = "default") -> Built:
    """Set up method ``name`` on these inputs (compiling / capturing as needed). Raises `Unavailable`."""
    cuda = logits.is_cuda
    if name.endswith("-graph") and not cuda:
        raise Unavailable("CUDA graphs need a CUDA device")
    if name.startswith("flashinfer") and not cuda:
        raise Unavailable("flashinfer needs a CUDA device")
    if name == "rtkern-triton" or name == "rtkern-triton-graph":
        from rtkern.kernels._common import triton_runs_on
        if not triton_runs_on(logits.device):
            raise Unavailable("the Triton sampler needs CUDA (or TRITON_INTERPRET=1, far too slow to time)")

    if name == "naive":
        return _eager(lambda: naive_refusal_sample(logits, spec, controls))
    if name == "naive-compile":
        fn = compiled_naive(compile_mode)
        return _eager(lambda: fn(logits, spec, controls))
    if name == "flashinfer":
        return _eager(lambda: flashinfer_sample(logits, spec, controls))
    if name == "rtkern-torch":
        return _eager(lambda: rtkern_torch(logits, spec, controls))
    if name == "rtkern-triton":
        out = SampleOutput.empty(logits.shape[0], spec.num_categories, logits.device)
        return _eager(lambda: rtkern_triton(logits, spec, controls, out=out), keep=[out])
    if name == "naive-graph":
        draw, note = "multinomial", None
        if _syncs(lambda: naive_refusal_sample(logits, spec, controls)):
            draw, note = "exponential", "torch.multinomial syncs here; captured its exponential race instead"
        g, res = _capture(lambda: naive_refusal_sample(logits, spec, controls, draw=draw))
        return Built(g.replay, lambda: res, "graph", [g, res], note)
    if name == "flashinfer-graph":
        flashinfer_sample(logits, spec, controls)  # import / JIT outside the capture
        g, res = _capture(lambda: flashinfer_sample(logits, spec, controls))
        return Built(g.replay, lambda: res, "graph", [g, res])
    if name == "rtkern-triton-graph":
        out = SampleOutput.empty(logits.shape[0], spec.num_categories, logits.device)
        g, _ = _capture(lambda: rtkern_triton(logits, spec, controls, out=out))
        return Built(g.replay, lambda: out, "graph", [g, out])
    raise ValueError(f"unknown method {name!r}; choose from {list(METHODS)}")


def _eager(call: Callable[[], object], keep: Optional[list] = None) -> Built:
    last: list = [None]

    def result():
        if last[0] is None:
            last[0] = call()
        return last[0]
    return Built(call, result, "eager", keep or [])


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(call: Callable[[], object], device, *, reps: int = 5, wall_calls: int = 200) -> tuple[float, float]:
    """``(us, wall_us)``: median device time per call and back-to-back wall time per call, in µs.

    CUDA: ``triton.testing.do_bench(return_mode="median")`` for ``us``; ``wall_us`` = perf_counter over
    ``wall_calls`` calls with one synchronisation. CPU: both are the median of ``reps`` timed calls.
    """
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        us = do_bench(call, warmup=25, rep=100, return_mode="median") * 1e3
        call()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(wall_calls):
            call()
        _sync(device)
        return us, (time.perf_counter() - t0) / wall_calls * 1e6
    call()  # warm-up
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        if times[-1] > 2.0 and len(times) >= 3:  # keep slow CPU points bounded
            break
    us = statistics.median(times) * 1e6
    return us, us


# --------------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------------

@dataclass
class Row:
    method: str
    kind: str
    batch: int
    vocab: int
    dtype: str
    us: Optional[float] = None
    wall_us: Optional[float] = None
    gbps: Optional[float] = None
    floor_us: Optional[float] = None
    x_floor: Optional[float] = None
    max_prob_err: Optional[float] = None
    decisions_match: Optional[float] = None
    status: str = "ok"  # ok | skipped | error
    error: Optional[str] = None
    note: Optional[str] = None


def _check_result(res, logits, spec, controls, want) -> tuple[Optional[float], Optional[float]]:
    if not isinstance(res, SampleOutput):
        return None, None
    probs_ref, refused_ref = want
    err = (res.refusal_probs.float() - probs_ref).abs().max().item()
    match = (res.refused.to(torch.int32) == refused_ref).float().mean().item()
    return err, match


def bench_point(batch: int, vocab: int, dtype: str, methods: Sequence[str], device, *,
                bandwidth: float = H100_BANDWIDTH, reps: int = 5, categories: int = 5,
                compile_mode: str = "default", progress=None) -> list[Row]:
    """Time every method at one (batch, vocab, dtype) point; failures become rows with a status."""
    device = torch.device(device)
    tdtype = DTYPES[dtype]
    logits, spec, controls = make_inputs(batch, vocab, tdtype, device, categories=categories)
    nbytes = batch * vocab * tdtype.itemsize
    floor_us = nbytes / bandwidth * 1e6
    ref = sample_reference(logits, spec, controls)
    want = (refusal_probs_reference(logits, spec, controls.logit_bias), ref.refused)
    rows = []
    for name in methods:
        if progress is not None:
            progress.set_postfix_str(f"B={batch} V={vocab} {dtype} {name}")
        row = Row(name, method_kind(name), batch, vocab, dtype, floor_us=floor_us)
        built = None
        try:
            built = build_method(name, logits, spec, controls, compile_mode=compile_mode)
            row.note = built.note
            row.us, row.wall_us = time_call(built.call, device, reps=reps)
            row.gbps = nbytes / (row.us * 1e-6) / 1e9
            row.x_floor = row.us / floor_us
            row.max_prob_err, row.decisions_match = _check_result(built.result(), logits, spec, controls, want)
        except Unavailable as e:
            row.status, row.error = "skipped", str(e)
        except Exception as e:  # noqa: BLE001 - one failing baseline must not end the run
            row.status, row.error = "error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            try:
                _sync(device)
            except Exception:  # noqa: BLE001
                pass
        finally:
            del built
        rows.append(row)
    del logits, controls, ref, want
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def environment(device) -> dict:
    device = torch.device(device)
    info = {"device": str(device), "device_name": platform.processor() or platform.machine(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    for lib in ("triton", "transformers", "flashinfer"):
        try:
            info[lib] = getattr(__import__(lib), "__version__", "unknown")
        except Exception:  # noqa: BLE001 - an optional library that does not import is recorded as absent
            info[lib] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["sm_count"] = props.multi_processor_count
        info["cuda"] = torch.version.cuda
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write), the ceiling the byte floors use.

    Measured in the same process as the timings, so an H200 is judged against an H200 (1 GiB on CUDA,
    median of 20 copies by CUDA events; 256 MiB on the CPU).
    """
    device = torch.device(device)
    n = nbytes if device.type == "cuda" else min(nbytes, 1 << 28)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(20 if device.type == "cuda" else 3):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    return 2 * n / statistics.median(times)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


TABLE_COLUMNS = ("V", "dtype", "B", "method", "us", "wall_us", "GB/s", "x_floor", "max|dp|", "match", "note")


def format_table(rows: Iterable[Row]) -> str:
    """Fixed-width table; ``us`` is median device time, ``wall_us`` includes host overhead."""
    lines = []
    for r in rows:
        note = (r.note or "") if r.status == "ok" else f"{r.status}: {r.error}"
        lines.append((str(r.vocab), r.dtype, str(r.batch), r.method, _fmt(r.us, ".1f"), _fmt(r.wall_us, ".1f"),
                      _fmt(r.gbps, ".3g"), _fmt(r.x_floor, ".2f"), _fmt(r.max_prob_err, ".1e"),
                      _fmt(r.decisions_match, ".3f"), note))
    widths = [max([len(h)] + [len(l[i]) for l in lines]) for i, h in enumerate(TABLE_COLUMNS)]
    widths[-1] = 0
    fmt = lambda cells: "  ".join(c.rjust(w) if i not in (1, 3, 10) else c.ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(TABLE_COLUMNS), fmt(["-" * w for w in widths[:-1]] + ["----"])] + [fmt(l) for l in lines])


def format_markdown(rows: Iterable[Row]) -> str:
    head = "| V | dtype | B | method | µs | wall µs | GB/s | × floor | note |\n|---|---|---|---|---|---|---|---|---|"
    body = [f"| {r.vocab} | {r.dtype} | {r.batch} | {r.method} | {_fmt(r.us, '.1f')} | {_fmt(r.wall_us, '.1f')} | "
            f"{_fmt(r.gbps, '.3g')} | {_fmt(r.x_floor, '.2f')} | {(r.note or '') if r.status == 'ok' else r.status + ': ' + str(r.error)} |"
            for r in rows]
    return "\n".join([head] + body)


def plot(rows: Sequence[Row], path: Path, title: str = "") -> Path:
    """µs vs batch size per method (log-log), one panel per (vocab, dtype), byte floor dashed."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    panels = sorted({(r.vocab, r.dtype) for r in rows})
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2), squeeze=False)
    methods = [m for m in METHODS if any(r.method == m for r in rows)]
    for ax, (vocab, dtype) in zip(axes[0], panels):
        sub = [r for r in rows if r.vocab == vocab and r.dtype == dtype]
        for m in methods:
            pts = sorted((r.batch, r.us) for r in sub if r.method == m and r.us is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m, linestyle="--" if m.endswith("-graph") else "-")
        floor = sorted({(r.batch, r.floor_us) for r in sub if r.floor_us is not None})
        if floor:
            ax.plot(*zip(*floor), color="black", linestyle=":", label="byte floor")
        ax.set_xscale("log", base=2)
        bs = sorted({r.batch for r in sub})
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("median µs per call")
        ax.set_title(f"V={vocab}, {dtype}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(batches: Sequence[int], vocabs: Sequence[int], dtypes: Sequence[str], methods: Sequence[str],
        device, out_dir, *, bandwidth: float = H100_BANDWIDTH, reps: int = 5, categories: int = 5,
        compile_mode: str = "default", progress: bool = True, stream=None, argv=None) -> dict:
    """Run the grid, print the table to ``stream`` (stdout) and write sampler.json/.md/.png to ``out_dir``."""
    from tqdm import tqdm

    stream = stream or sys.stdout
    device = torch.device(device)
    env = environment(device)
    result = {
        "benchmark": "sampler",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "rtkern bench sampler " + " ".join(argv) if argv is not None else None,
        **env,
        "bandwidth_bytes_per_s": bandwidth,
        "categories": categories,
        "timing": ("triton.testing.do_bench median (us); back-to-back perf_counter incl. host overhead (wall_us)"
                   if device.type == "cuda" else f"time.perf_counter median of {reps} calls"),
        "rows": [],
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = [(v, d, b) for v in vocabs for d in dtypes for b in batches]
    rows: list[Row] = []
    bar = tqdm(grid, desc="bench sampler", unit="point", disable=not progress, file=sys.stderr)
    for vocab, dtype, batch in bar:
        rows.extend(bench_point(batch, vocab, dtype, methods, device, bandwidth=bandwidth, reps=reps,
                                categories=categories, compile_mode=compile_mode, progress=bar))
        # after every point: a run stopped at a device call's time limit keeps what it measured
        result["rows"] = [asdict(r) for r in rows]
        (out_dir / "sampler.json").write_text(json.dumps(result, indent=2) + "\n")
        (out_dir / "sampler.md").write_text(format_markdown(rows) + "\n")
    bar.close()
    title = f"refusal sampler on {env['device_name']} (torch {env['torch']}, triton {env['triton']})"
    plot(rows, out_dir / "sampler.png", title)

    print(f"# {title}; bandwidth floor {bandwidth / 1e12:.2f} TB/s", file=stream)
    print(f"# us: {result['timing']}", file=stream)
    print(format_table(rows), file=stream)
    print(f"# wrote {out_dir / 'sampler.json'}, {out_dir / 'sampler.md'}, {out_dir / 'sampler.png'}", file=stream)
    return result


# --------------------------------------------------------------------------------------------------
# Command line (shared with `rtkern bench sampler`)
# --------------------------------------------------------------------------------------------------

def _list_of(conv):
    def parse(text: str):
        try:
            return [conv(x) for x in text.split(",") if x]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _dtype(name: str) -> str:
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"dtype must be one of {list(DTYPES)}, got {name!r}")
    return name


def _method(name: str) -> str:
    if name not in METHODS:
        raise argparse.ArgumentTypeError(f"method must be one of {list(METHODS)}, got {name!r}")
    return name


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``rtkern bench sampler``; lists take spaces or commas (``--batch 1 8`` = ``--batch 1,8``)."""
    p.add_argument("--batch", nargs="+", type=_list_of(int), metavar="B",
                   help=f"batch sizes (default CUDA {list(GPU_BATCHES)}, CPU {list(CPU_BATCHES)})")
    p.add_argument("--vocab", nargs="+", type=_list_of(int), metavar="V",
                   help=f"vocabulary sizes (default CUDA {list(GPU_VOCABS)}, CPU {list(CPU_VOCABS)})")
    p.add_argument("--dtype", nargs="+", type=_list_of(_dtype), metavar="DT",
                   help=f"logit dtypes from {list(DTYPES)} (default CUDA {list(GPU_DTYPES)}, CPU {list(CPU_DTYPES)})")
    p.add_argument("--methods", nargs="+", type=_list_of(_method), metavar="M",
                   help=f"methods from {list(METHODS)} (default CUDA {list(GPU_DEFAULT_METHODS)}, "
                        f"CPU {list(CPU_DEFAULT_METHODS)})")
    p.add_argument("--device", default=None, help="cuda[:i] or cpu (default: cuda when available)")
    p.add_argument("--bandwidth", type=finite_float(0.0, strict=True), default=None,
                   help="memory bandwidth in bytes/s for the byte floor (default: the device copy bandwidth, "
                        "measured in the run)")
    p.add_argument("--categories", type=int, default=5, help="number of refusal tokens C (default 5)")
    p.add_argument("--reps", type=int_at_least(1), default=5, help="timed calls per point on the CPU (default 5)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode for naive-compile (default, max-autotune-no-cudagraphs, ...)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def _flat(values, default):
    return list(default) if not values else [x for group in values for x in group]


def run_from_args(args: argparse.Namespace, argv=None) -> int:
    argv = argv if argv is not None else getattr(args, "_argv_tail", None)  # recorded in the JSON
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    batches = _flat(args.batch, GPU_BATCHES if cuda else CPU_BATCHES)
    vocabs = _flat(args.vocab, GPU_VOCABS if cuda else CPU_VOCABS)
    dtypes = _flat(args.dtype, GPU_DTYPES if cuda else CPU_DTYPES)
    methods = _flat(args.methods, GPU_DEFAULT_METHODS if cuda else CPU_DEFAULT_METHODS)
    bad = [x for x in batches + vocabs if x < 1]
    if bad or args.categories < 1:
        print(f"error: batch/vocab/categories must be positive (got {bad or args.categories})",
              file=sys.stderr)
        return 2
    small = [v for v in vocabs if v <= args.categories + 1]
    if small:
        print(f"error: vocab {small} too small for {args.categories} refusal tokens + [respond]", file=sys.stderr)
        return 2
    bandwidth = args.bandwidth or copy_bandwidth(device)
    result = run(batches, vocabs, dtypes, methods, device, args.out, bandwidth=bandwidth, reps=args.reps,
                 categories=args.categories, compile_mode=args.compile_mode, progress=not args.no_progress,
                 argv=argv)
    failed = [r for r in result["rows"] if r["status"] == "error"]
    return 1 if failed and len(failed) == len(result["rows"]) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rtkern.bench.sampler", description=__doc__.splitlines()[0])
    add_arguments(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_from_args(p.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
