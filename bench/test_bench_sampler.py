"""pytest-benchmark suite for the refusal sampler (run explicitly: ``pytest bench/``).

Same method builders as ``rtkern bench sampler`` (`rtkern.bench.sampler.build_method`). On the CPU it
times the PyTorch reference and the naive eager pipeline on a small grid; on CUDA it adds the Triton
kernel (eager and in a CUDA graph) and the naive pipeline in a CUDA graph. Each timed call ends with a
device synchronisation, so the numbers include host overhead (``rtkern bench sampler`` also reports
device-only medians). No timing thresholds: the suite checks that every method runs and agrees with
the reference on the refusal decisions.
"""
import pytest
import torch

from rtkern.bench.sampler import DTYPES, Unavailable, build_method, make_inputs
from rtkern.reference import sample_reference

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

if ON_GPU:
    GRID = [(b, v, d) for v in (49152, 128256) for d in ("bf16",) for b in (1, 32, 256)]
    METHODS = ["naive", "naive-graph", "rtkern-triton", "rtkern-triton-graph", "flashinfer"]
else:
    GRID = [(b, 32000, "fp32") for b in (1, 8)]
    METHODS = ["naive", "rtkern-torch"]


def _synced(call):
    if DEVICE.type != "cuda":
        return call

    def run():
        call()
        torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch,vocab,dtype", GRID, ids=[f"B{b}-V{v}-{d}" for b, v, d in GRID])
def test_sampler(benchmark, method, batch, vocab, dtype):
    logits, spec, controls = make_inputs(batch, vocab, DTYPES[dtype], DEVICE)
    try:
        built = build_method(method, logits, spec, controls)
    except Unavailable as e:
        pytest.skip(str(e))
    nbytes = batch * vocab * DTYPES[dtype].itemsize
    benchmark.group = f"V={vocab} {dtype} B={batch}"
    benchmark.extra_info.update(method=method, kind=built.kind, logits_bytes=nbytes)
    benchmark(_synced(built.call))
    median = benchmark.stats.stats.median if benchmark.stats is not None else None
    if median:
        benchmark.extra_info["gbps"] = nbytes / median / 1e9

    res = built.result()
    if method == "rtkern-torch":
        return  # it is sample_reference itself: timed here, checked against the kernel in tests/test_sampler.py
    if hasattr(res, "refused"):  # flashinfer returns tokens only
        want = sample_reference(logits, spec, controls)
        assert torch.equal(res.refused.cpu(), want.refused.cpu())
        torch.testing.assert_close(res.refusal_probs.float(), want.refusal_probs, atol=1e-5, rtol=1e-3)
    else:
        assert res.shape == (batch,) and bool(((res >= 0) & (res < vocab)).all())
