"""Public sampler API: input validation, controls, refusal_probs, apply_refusal_, torch.compile, from_tokenizer.

tests/test_sampler.py checks the kernel against the reference; this file checks the contract around it
(DESIGN.md, "Fused sampler contract") through the public entry points, on both backends.
"""
import dataclasses
import re

import pytest
import torch

import rtkern
import rtkern.sampler as sampler_mod
from conftest import DEVICE, ON_GPU
from rtkern import (CATEGORIES, RefusalControls, RefusalSpec, SampleOutput, apply_refusal_, pack_vocab_mask,
                    refusal_probs, refusal_sample, unpack_vocab_mask)

BACKENDS = ["torch", "triton"]
NEG_INF = float("-inf")
# Expected probabilities are the softmax of the very values the sampler reads (bf16/fp16 logits widen to
# float32 exactly), so the only error left is float32 arithmetic, whatever the input dtype: ~1e-6
# relative is observed; 1e-5 leaves room without hiding a wrong normaliser or a dropped tile.
PROB_RTOL = 1e-5

# A small, valid baseline; every bad-input case below changes exactly one thing.
B, V, C = 2, 40, 2
SPEC = RefusalSpec([3, 5], 7)


def good_logits(dtype=torch.float32):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(0)).to(dtype).to(DEVICE)


def good_controls(**kw):
    return RefusalControls.build(B, C, DEVICE, **kw)


@pytest.fixture
def no_launch(monkeypatch):
    """Make any compute path fail loudly, so a check that runs too late shows up as an AssertionError."""
    def launched(*args, **kwargs):
        raise AssertionError("a kernel or the reference ran before the bad input was rejected")
    for name in ("refusal_sample_launch_prechecked", "sample_reference", "refusal_probs_reference", "_decide_torch"):
        monkeypatch.setattr(sampler_mod, name, launched)


def call(entry, logits, spec, controls, backend, **kw):
    if entry == "sample":
        return refusal_sample(logits, spec, controls, backend=backend, **kw)
    if entry == "probs":
        return refusal_probs(logits, spec, backend=backend, **kw)
    return apply_refusal_(logits, spec, controls, backend=backend, **kw)


# --------------------------------------------------------------------------------------------------
# 1. Bad inputs raise before anything runs, naming what was expected and what was given.

BAD_LOGITS = [
    ("1-d", lambda: torch.randn(V), ValueError, r"\[B, V\], got shape \[40\]"),
    ("3-d", lambda: torch.randn(B, V, 1), ValueError, r"\[B, V\], got shape \[2, 40, 1\]"),
    ("int64", lambda: torch.zeros(B, V, dtype=torch.int64), TypeError,
     r"float32, bfloat16 or float16, got torch.int64"),
    ("float64", lambda: torch.zeros(B, V, dtype=torch.float64), TypeError, r"float16, got torch.float64"),
    ("no rows", lambda: torch.zeros(0, V), ValueError, r"non-empty, got shape \[0, 40\]"),
    ("no vocab", lambda: torch.zeros(B, 0), ValueError, r"non-empty, got shape \[2, 0\]"),
    ("transposed", lambda: torch.randn(V, B).t(), ValueError,
     r"contiguous in the vocabulary dim, got strides \[1, 2\]"),
    ("list", lambda: torch.randn(B, V).tolist(), TypeError, r"torch.Tensor, got list"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", ["sample", "probs", "apply"])
@pytest.mark.parametrize("make,exc,match", [c[1:] for c in BAD_LOGITS], ids=[c[0] for c in BAD_LOGITS])
def test_bad_logits_are_rejected(no_launch, entry, backend, make, exc, match):
    logits = make()
    if isinstance(logits, torch.Tensor):
        logits = logits.to(DEVICE)
    with pytest.raises(exc, match=match):
        call(entry, logits, SPEC, good_controls(), backend)


def _replace(**fields):
    return lambda: dataclasses.replace(good_controls(), **fields)


BAD_CONTROLS = [
    ("not controls", lambda: {"thresholds": 0.5}, TypeError, r"controls must be RefusalControls, got dict"),
    ("None", lambda: None, TypeError, r"controls must be RefusalControls, got NoneType"),
    # "meta" stands in for a second device: the check compares devices and never reads the values.
    ("other device", _replace(seed=torch.zeros(B, dtype=torch.int64, device="meta")), ValueError,
     r"controls.seed is on meta, logits on " + DEVICE.type),
    ("batch 3 vs 2", lambda: RefusalControls.build(3, C, DEVICE), ValueError,
     r"controls.thresholds must have shape \[2, 2\], got \[3, 2\]"),
    ("3 categories vs 2", lambda: RefusalControls.build(B, 3, DEVICE), ValueError,
     r"controls.thresholds must have shape \[2, 2\], got \[2, 3\]"),
    ("thresholds 1-d", _replace(thresholds=torch.zeros(B, device=DEVICE)), ValueError,
     r"controls.thresholds must have shape \[2, 2\], got \[2\]"),
    ("thresholds float64", _replace(thresholds=torch.zeros(B, C, dtype=torch.float64, device=DEVICE)), TypeError,
     r"controls.thresholds must be torch.float32, got torch.float64"),
    ("temperature strided", _replace(temperature=torch.ones(B, 2, device=DEVICE)[:, 0]), ValueError,
     r"controls.temperature must be contiguous"),
    ("mode int64", _replace(mode=torch.zeros(B, dtype=torch.int64, device=DEVICE)), TypeError,
     r"controls.mode must be torch.int32, got torch.int64"),
    ("mask width", lambda: good_controls(vocab_mask=torch.zeros(B, 3, dtype=torch.int32)), ValueError,
     r"controls.vocab_mask must have shape \[2, 2\], got \[2, 3\]"),
    ("mask int64", _replace(vocab_mask=torch.zeros(B, 2, dtype=torch.int64, device=DEVICE)), TypeError,
     r"controls.vocab_mask must be torch.int32, got torch.int64"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", ["sample", "apply"])
@pytest.mark.parametrize("make,exc,match", [c[1:] for c in BAD_CONTROLS], ids=[c[0] for c in BAD_CONTROLS])
def test_bad_controls_are_rejected(no_launch, entry, backend, make, exc, match):
    with pytest.raises(exc, match=match):
        call(entry, good_logits(), SPEC, make(), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", ["sample", "probs", "apply"])
@pytest.mark.parametrize("spec,exc,match", [
    (RefusalSpec([3, 45], 7), ValueError, r"\[45\] are out of range for a vocabulary of 40"),
    (RefusalSpec([3, 5], 40), ValueError, r"\[40\] are out of range for a vocabulary of 40"),
    ((3, 5), TypeError, r"spec must be a RefusalSpec, got tuple"),
], ids=["refusal id", "respond id", "tuple"])
def test_spec_that_does_not_fit_the_logits_is_rejected(no_launch, entry, backend, spec, exc, match):
    with pytest.raises(exc, match=match):
        call(entry, good_logits(), spec, good_controls(), backend)


@pytest.mark.parametrize("entry", ["sample", "probs", "apply"])
@pytest.mark.parametrize("backend", ["cuda", "Triton", "", "reference"])
def test_unknown_backend_is_rejected(no_launch, entry, backend):
    with pytest.raises(ValueError, match=re.escape(f"backend must be 'triton', 'torch' or None, got {backend!r}")):
        call(entry, good_logits(), SPEC, good_controls(), backend)


@pytest.mark.skipif(ON_GPU, reason="on a GPU the Triton backend needs no interpreter")
def test_triton_on_cpu_without_interpreter_is_rejected(no_launch, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' needs a CUDA tensor or TRITON_INTERPRET=1"):
        refusal_sample(good_logits(), SPEC, good_controls(), backend="triton")


def _out(tokens=(B,), probs=(B, C), refused=(B,), tdtype=torch.int64, pdtype=torch.float32, rdtype=torch.int32):
    return SampleOutput(torch.empty(tokens, dtype=tdtype, device=DEVICE),
                        torch.empty(probs, dtype=pdtype, device=DEVICE),
                        torch.empty(refused, dtype=rdtype, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out,exc,match", [
    (_out(tokens=(3,)), ValueError,
     r"out.tokens must be a contiguous torch.int64 tensor of shape \[2\].*got torch.int64 \[3\]"),
    (_out(tdtype=torch.int32), ValueError, r"out.tokens must be a contiguous torch.int64 .*got torch.int32 \[2\]"),
    (_out(probs=(B, 3)), ValueError,
     r"out.refusal_probs must be .* shape \[2, 2\].*got torch.float32 \[2, 3\]"),
    (_out(pdtype=torch.float16), ValueError,
     r"out.refusal_probs must be a contiguous torch.float32 .*got torch.float16"),
    (_out(rdtype=torch.int64), ValueError, r"out.refused must be a contiguous torch.int32 .*got torch.int64"),
    (tuple(_out()), TypeError, r"out must be a SampleOutput, got tuple"),
    (SampleOutput(None, None, None), TypeError,
     r"out.tokens must be a torch.int64 tensor of shape \[2\], got NoneType"),
    (_out()._replace(refusal_probs=torch.empty(B, C, device=DEVICE, requires_grad=True)), ValueError,
     r"out.refusal_probs is written in place: it must not require grad"),
], ids=["tokens shape", "tokens dtype", "probs shape", "probs dtype", "refused dtype", "tuple", "Nones", "grad"])
def test_bad_out_is_rejected(no_launch, backend, out, exc, match):
    with pytest.raises(exc, match=match):
        refusal_sample(good_logits(), SPEC, good_controls(), out=out, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_sharing_memory_with_the_controls_is_rejected(no_launch, backend):
    # The kernel stores the probabilities before it reads the thresholds: p >= p would refuse every row.
    controls = good_controls(thresholds=0.9)
    out = _out()._replace(refusal_probs=controls.thresholds)
    with pytest.raises(ValueError, match=r"out.refusal_probs and controls.thresholds overlap in memory"):
        refusal_sample(good_logits(), SPEC, controls, out=out, backend=backend)


def test_first_step_flags_take_bools_and_zero_one():
    for value in (True, [True, False], [1, 0], torch.tensor([1, 0]), 0):
        got = RefusalControls.build(B, C, DEVICE, first_step=value).first_step
        assert got.dtype == torch.bool and got.tolist() == torch.as_tensor(value).expand(B).bool().tolist()


def test_remembered_checks_still_catch_a_replaced_field_or_another_shape(no_launch):
    # The per-step fast path remembers a passing check; a replaced tensor or another batch re-checks.
    controls, out = good_controls(), _out()
    with pytest.raises(AssertionError, match="before the bad input"):   # passes the checks, reaches a launch
        refusal_sample(good_logits(), SPEC, controls, out=out, backend="torch")
    controls.thresholds = torch.zeros(B, C + 1, device=DEVICE)
    with pytest.raises(ValueError, match=r"controls.thresholds must have shape \[2, 2\], got \[2, 3\]"):
        refusal_sample(good_logits(), SPEC, controls, out=out, backend="torch")
    with pytest.raises(ValueError, match=r"controls.thresholds must have shape \[3, 2\], got \[2, 2\]"):
        refusal_sample(torch.zeros(3, V, device=DEVICE), SPEC, good_controls(), backend="torch")
    with pytest.raises(ValueError, match=r"out.tokens must be .* shape \[3\]"):
        refusal_sample(torch.zeros(3, V, device=DEVICE), SPEC, RefusalControls.build(3, C, DEVICE), out=out,
                       backend="torch")


def test_remembered_checks_still_catch_changed_mode_codes_and_grad_mode(no_launch):
    # values written into remembered tensors, and grad mode switched on, are caught on the next call
    controls, out = good_controls(), _out()
    out = out._replace(refusal_probs=out.refusal_probs.requires_grad_())
    with torch.no_grad(), pytest.raises(AssertionError, match="before the bad input"):
        refusal_sample(good_logits(), SPEC, controls, out=out, backend="torch")
    with pytest.raises(ValueError, match=r"out.refusal_probs is written in place: it must not require grad"):
        refusal_sample(good_logits(), SPEC, controls, out=out, backend="torch")
    if controls.mode.device.type == "cpu":
        controls.mode[0] = 7
        with pytest.raises(ValueError, match=r"mode codes must be 0 \(category\), 1 \(sum\) or 2 \(free\)"):
            refusal_sample(good_logits(), SPEC, controls, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias,exc,match", [
    ([[0.0, 0.0]] * B, TypeError, r"logit_bias must be a float32 \[2, 2\] tensor, got list"),
    (torch.zeros(B, 3), ValueError, r"logit_bias must be float32 \[2, 2\] on .*got torch.float32 \[2, 3\]"),
    (torch.zeros(B, C, dtype=torch.float64), ValueError, r"logit_bias must be float32 .*got torch.float64"),
    # The kernel walks a row's categories with unit stride: a transposed bias would be read wrongly.
    (torch.zeros(C, B).t(), ValueError, r"logit_bias must be contiguous in its last dim, got strides \[1, 2\]"),
], ids=["list", "shape", "float64", "transposed"])
def test_refusal_probs_rejects_bad_logit_bias(no_launch, backend, bias, exc, match):
    if isinstance(bias, torch.Tensor):
        bias = bias.to(DEVICE)
    with pytest.raises(exc, match=match):
        refusal_probs(good_logits(), SPEC, logit_bias=bias, backend=backend)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(refusal_ids=[]), ValueError, r"at least one token, got an empty sequence"),
    (dict(refusal_ids=[3, -1]), ValueError, r"non-negative ints, got -1"),
    (dict(refusal_ids=[3], respond_id=-2), ValueError, r"non-negative ints, got -2"),
    (dict(refusal_ids=[3, 2.0]), TypeError, r"non-negative ints, got 2.0"),
    (dict(refusal_ids=[True]), TypeError, r"non-negative ints, got True"),
    (dict(refusal_ids=[3, 4, 3]), ValueError, r"distinct, got \[3, 4, 3\]"),
    (dict(refusal_ids=[3, 4], respond_id=4), ValueError, r"respond_id 4 is also a refusal id in \[3, 4\]"),
    (dict(refusal_ids=[3, 4], names=["a"]), ValueError, r"expected 2 names \(one per refusal id\), got 1"),
    (dict(refusal_ids=[3], names=["a", "b"]), ValueError, r"expected 1 names \(one per refusal id\), got 2"),
    # A bare string would otherwise pass as one name per character when the lengths happen to agree.
    (dict(refusal_ids=[3, 4, 5], names="abc"), TypeError, r"sequence of 3 strings, got the string 'abc'"),
], ids=["empty", "negative", "negative respond", "float", "bool", "duplicate", "respond is refusal",
        "too few names", "too many names", "names string"])
def test_bad_spec_is_rejected(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RefusalSpec(**kwargs)


def test_spec_check_vocab_bounds():
    spec = RefusalSpec([0, 9], 10)
    spec.check_vocab(11)
    with pytest.raises(ValueError, match=r"\[10\] are out of range for a vocabulary of 10"):
        spec.check_vocab(10)
    with pytest.raises(ValueError, match=r"\[9, 10\] are out of range for a vocabulary of 9"):
        spec.check_vocab(9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,exc,match", [
    (lambda: torch.randn(1, V, device=DEVICE).expand(B, V), ValueError,
     r"rows must not overlap, got shape \[2, 40\] with strides \[0, 1\]"),
    (lambda: torch.randn(B, V, device=DEVICE, requires_grad=True), ValueError, r"does not require grad"),
    (lambda: torch.randn(B, V, device=DEVICE).requires_grad_()[:, :], ValueError, r"does not require grad"),
    (lambda: torch.inference_mode()(torch.randn)(B, V, device=DEVICE), ValueError,
     r"an inference tensor can be written only"),
], ids=["stride 0", "leaf with grad", "view with grad", "inference tensor"])
def test_apply_refusal_rejects_logits_it_cannot_write_in_place(no_launch, backend, make, exc, match):
    # These used to pass the checks, launch, and fail halfway through the writes.
    with pytest.raises(exc, match=match):
        apply_refusal_(make(), SPEC, good_controls(), backend=backend)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(thresholds=float("nan")), ValueError, r"thresholds must be >= 0 and not NaN.*got \[nan"),
    (dict(thresholds=torch.tensor([0.3, float("nan")])), ValueError, r"thresholds must be >= 0 and not NaN.*nan"),
    (dict(thresholds=-0.1), ValueError, r"thresholds must be >= 0 .*got \[-0.1"),
    (dict(temperature=-1.0), ValueError, r"temperature must be finite and >= 0 .*got \[-1.0"),
    (dict(temperature=float("nan")), ValueError, r"temperature must be finite and >= 0 .*got \[nan"),
    (dict(temperature=float("inf")), ValueError, r"temperature must be finite and >= 0 .*got \[inf"),
    (dict(logit_bias=float("inf")), ValueError, r"logit_bias must be finite, got \[inf"),
    (dict(logit_bias=torch.tensor([0.0, float("-inf")])), ValueError, r"logit_bias must be finite, got .*-inf"),
    (dict(mode="greedy"), ValueError, r"mode must be one of \['category', 'sum', 'free'\], got 'greedy'"),
    (dict(mode=["sum", "nope"]), ValueError, r"mode must be one of .*got 'nope'"),
    (dict(mode=torch.tensor([0, 3])), ValueError,
     r"mode codes must be 0 \(category\), 1 \(sum\) or 2 \(free\), got \[0, 3\]"),
    (dict(thresholds=torch.zeros(3)), ValueError,
     r"thresholds must be a scalar, a \[2\] or a \[2, 2\] tensor, got shape \[3\]"),
    (dict(temperature=[1.0, 1.0, 1.0]), ValueError,
     r"temperature must be a scalar or a \[2\] tensor, got shape \[3\]"),
    (dict(seed=1.5), TypeError, r"seed must be an int, got 1.5"),
    (dict(seed=torch.tensor([0.5, 1.0])), TypeError, r"seed must hold integers, got a torch.float32 tensor"),
    (dict(temperature="hot"), TypeError, r"temperature must be a scalar, a sequence or a tensor, got str"),
    (dict(vocab_mask=torch.zeros(B, 2, dtype=torch.int64)), TypeError, r"vocab_mask must be int32 .*got torch.int64"),
    (dict(vocab_mask=torch.zeros(3, 2, dtype=torch.int32)), ValueError,
     r"vocab_mask must be \[2, ceil\(V/32\)\], got \[3, 2\]"),
    (dict(vocab_mask=[[0, 1]] * B), TypeError, r"vocab_mask must be an int32 tensor, got list"),
    (dict(thresholds=True), TypeError, r"thresholds must be a number, got True"),
    (dict(temperature=True), TypeError, r"temperature must be a number, got True"),
    (dict(thresholds=torch.tensor([0.5 + 1j, 0.5])), TypeError, r"thresholds must be real, got a torch.complex64"),
    (dict(temperature=[1 + 1j, 1.0]), TypeError, r"temperature must be real, got a torch.complex64"),
    (dict(mode=2**40), ValueError, r"mode codes must be 0 \(category\), 1 \(sum\) or 2 \(free\), got \[1099511627776"),
    (dict(mode=torch.tensor([0, 2**32])), ValueError, r"mode codes must be .*got \[0, 4294967296\]"),
    (dict(seed=2**70), ValueError, r"seed must be numbers that fit torch.int64, got 1180591620717411303424"),
    (dict(seed=[1.7, 2.0]), TypeError, r"seed must hold integers, got a torch.float32 tensor"),
    (dict(position=[True, False]), TypeError, r"position must be numeric, got a bool tensor"),
    (dict(thresholds=[[0.1, 0.2], [0.3]]), ValueError, r"thresholds must be numbers that fit a tensor"),
    (dict(first_step=2), ValueError, r"first_step must be bools or 0/1, got \[2\]"),
    (dict(first_step=torch.tensor([0, 7])), ValueError, r"first_step must be bools or 0/1, got \[0, 7\]"),
    (dict(first_step=[1.0, 0.0]), TypeError, r"first_step must hold integers"),
])
def test_bad_control_values_are_rejected_by_build(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        RefusalControls.build(B, C, DEVICE, **kwargs)


@pytest.mark.parametrize("mode", ["category", "sum"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_threshold_just_above_one_never_refuses(backend, mode):
    # 1 + 1e-9 rounds to 1.0 in float32, and in sum mode rounding can take sum(p) past 1: a threshold above
    # 1 must still switch refusal off, here on rows whose refusal tokens hold all the mass.
    spec = RefusalSpec([1, 2, 3, 4, 5], 6)
    logits = torch.full((3, 8), -100.0)
    logits[0, 1] = 50.0                                                       # p_0 = 1 exactly
    logits[1, 1:6] = torch.tensor([46.625, 40.625, 44.75, 45.0, 46.5])        # float32 sum(p) > 1
    logits[2, 1:6] = torch.tensor([3.0, 1.0, 2.0, 2.5, 0.5]) + 60.0
    for thr in (1 + 1e-9, torch.tensor(1 + 1e-9, dtype=torch.float64), 1.0000001192092896):
        controls = RefusalControls.build(3, 5, DEVICE, thresholds=thr, mode=mode, temperature=0.0)
        assert (controls.thresholds > 1).all()
        res = refusal_sample(logits.to(DEVICE), spec, controls, backend=backend)
        assert res.refused.tolist() == [-1] * 3 and res.tokens.tolist() == [6] * 3
    # ... while 1.0 itself refuses a row whose refusal token holds all the mass.
    res = refusal_sample(logits.to(DEVICE), spec, RefusalControls.build(3, 5, DEVICE, thresholds=1.0, mode=mode,
                                                                        temperature=0.0), backend=backend)
    assert res.refused[0].item() == 0


def test_cpu_reference_decides_a_row_the_same_in_any_batch():
    # Rule 6 on the default CPU path: torch splits a [1, V] and a [B, V] reduction over threads differently,
    # which moved float32 probabilities in their last bit and flipped decisions at a calibrated threshold.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(64, 128256, generator=gen) * 4
        spec = RefusalSpec([5, 7], 9)
        batched = refusal_probs(logits, spec)
        for r in range(logits.shape[0]):
            assert torch.equal(refusal_probs(logits[r:r + 1].clone(), spec)[0], batched[r]), r
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_mode_code_in_cpu_controls_is_rejected(no_launch, backend):
    # Controls built directly skip build's value checks; on the CPU the sampler can read the codes for free.
    controls = dataclasses.replace(RefusalControls.build(B, C), mode=torch.tensor([0, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"mode codes must be 0 \(category\), 1 \(sum\) or 2 \(free\), got \[0, 7\]"):
        refusal_sample(good_logits().cpu(), SPEC, controls, backend=backend if not ON_GPU else "torch")


@pytest.mark.parametrize("batch", [0, -1, 1.5, True, "2", None])
def test_bad_batch_is_rejected_by_build(batch):
    with pytest.raises(ValueError, match=re.escape(f"batch must be a positive int, got {batch!r}")):
        RefusalControls.build(batch, C)


@pytest.mark.parametrize("num_categories", [0, 2.0, False])
def test_bad_num_categories_is_rejected_by_build(num_categories):
    with pytest.raises(ValueError,
                       match=re.escape(f"num_categories must be a positive int, got {num_categories!r}")):
        RefusalControls.build(B, num_categories)


def _snapshot(controls):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in controls.__dict__.items()}


def _assert_unchanged(controls, before):
    for k, v in before.items():
        now = getattr(controls, k)
        assert (now is None) == (v is None), k
        if v is not None:
            assert torch.equal(now, v), f"a rejected update_ wrote into controls.{k}"


@pytest.mark.parametrize("values,exc,match", [
    (dict(temperature=0.25, top_k=5), TypeError, r"unknown control 'top_k', expected one of \['thresholds'"),
    (dict(thresholds=0.9, temperature=-1.0), ValueError, r"temperature must be finite and >= 0"),
    (dict(temperature=0.25, vocab_mask=torch.zeros(B, 3, dtype=torch.int32)), ValueError,
     r"vocab_mask must keep its shape \[2, 2\], got \[2, 3\]"),
    (dict(temperature=0.25, vocab_mask=None), ValueError, r"vocab_mask can be updated in place only when"),
])
def test_rejected_update_leaves_controls_untouched(values, exc, match):
    controls = good_controls(temperature=1.0, thresholds=0.5, vocab_mask=torch.full((B, 2), -1, dtype=torch.int32))
    before = _snapshot(controls)
    with pytest.raises(exc, match=match):
        controls.update_(**values)
    # Half-applied updates would silently change the next CUDA-graph replay.
    _assert_unchanged(controls, before)


def test_update_mask_on_controls_without_mask_is_rejected():
    controls = good_controls()
    with pytest.raises(ValueError, match=r"vocab_mask can be updated in place only when both old and new are tensors"):
        controls.update_(vocab_mask=torch.zeros(B, 2, dtype=torch.int32))
    assert controls.vocab_mask is None


# --------------------------------------------------------------------------------------------------
# 2. Controls own their buffers.

@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_one_defaults_work_on_both_backends(backend):
    controls = RefusalControls.build(1, 3, DEVICE)
    for name in ("thresholds", "logit_bias", "mode", "temperature", "first_step", "seed", "position"):
        t = getattr(controls, name)
        assert t.is_contiguous() and 0 not in t.stride(), f"{name} has strides {t.stride()}"
    gen = torch.Generator().manual_seed(1)
    spec = RefusalSpec([10, 20, 30], 40)
    logits = torch.randn(1, 97, generator=gen).to(DEVICE)
    logits[0, 20] = 9.0  # p ~ 0.98 for category 1 against threshold 0.5
    out = refusal_sample(logits, spec, controls, backend=backend)
    assert out.tokens.tolist() == [20] and out.refused.tolist() == [1]
    p = torch.softmax(logits.double(), 1)[:, [10, 20, 30]]
    torch.testing.assert_close(out.refusal_probs.double(), p, rtol=PROB_RTOL, atol=0)
    # The same controls once the decision is taken: a later step samples an ordinary token.
    controls.update_(first_step=False, temperature=0.0)
    out = refusal_sample(logits, spec, controls, backend=backend)
    ordinary = logits.clone()
    ordinary[:, list(spec.control_ids)] = NEG_INF
    assert out.tokens.tolist() == ordinary.argmax(1).tolist() and out.refused.tolist() == [-1]


@pytest.mark.parametrize("batch", [1, 3])
def test_update_never_writes_into_the_callers_tensors(batch):
    # Same dtype and device as the stored buffers, so a build that kept views would alias them.
    thr = torch.tensor([0.2, 0.3], device=DEVICE)
    temp = torch.full((batch,), 0.7, device=DEVICE)
    seed = torch.arange(batch, device=DEVICE)
    first = torch.ones(batch, dtype=torch.bool, device=DEVICE)
    mask_row = torch.full((2,), -1, dtype=torch.int32, device=DEVICE)
    kept = [t.clone() for t in (thr, temp, seed, first, mask_row)]
    controls = RefusalControls.build(batch, 2, DEVICE, thresholds=thr, temperature=temp, seed=seed,
                                     first_step=first, vocab_mask=mask_row)
    new_thr = torch.rand(batch, 2, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    controls.update_(thresholds=new_thr, temperature=0.0, seed=7, first_step=False,
                     vocab_mask=torch.zeros(2, dtype=torch.int32, device=DEVICE))
    for t, k in zip((thr, temp, seed, first, mask_row), kept):
        assert torch.equal(t, k), "update_ wrote into a tensor the caller passed to build"
    # Per-row values land in their rows: a stride-0 buffer would hold one row repeated.
    assert torch.equal(controls.thresholds, new_thr)
    assert controls.temperature.tolist() == [0.0] * batch and controls.seed.tolist() == [7] * batch
    assert not controls.first_step.any() and not controls.vocab_mask.any()


# --------------------------------------------------------------------------------------------------
# 3. refusal_probs is softmax(z)[ids] over the full vocabulary.

def probs_case(b, v, c, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    spec = RefusalSpec(torch.randperm(v, generator=gen)[:c].tolist())
    z = torch.randn(b, v, generator=gen) * 3
    # Spread the refusal probabilities from negligible to dominant.
    z[:, list(spec.refusal_ids)] += torch.rand(b, c, generator=gen) * 16 - 4
    return z.to(dtype).to(DEVICE), spec


def softmax64(z, spec, bias=None):
    z = z.double().clone()
    if bias is not None:
        z[:, list(spec.refusal_ids)] += bias.double()
    return torch.softmax(z, 1)[:, list(spec.refusal_ids)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [111, 1000])
def test_refusal_probs_equal_float64_softmax(backend, dtype, v):
    logits, spec = probs_case(5, v, 3, dtype, seed=v)
    p = refusal_probs(logits, spec, backend=backend)
    assert p.dtype == torch.float32 and p.shape == (5, 3)
    torch.testing.assert_close(p.double(), softmax64(logits, spec), rtol=PROB_RTOL, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refusal_probs_large_vocab_with_row_strided_bias(backend):
    logits, spec = probs_case(2, 49158, 5, torch.bfloat16, seed=3)
    # A bias with a row stride but unit category stride is legal and must be read row by row.
    bias = (torch.randn(2, 8, generator=torch.Generator().manual_seed(4)) * 3)[:, 1:6].to(DEVICE)
    p = refusal_probs(logits, spec, logit_bias=bias, backend=backend)
    torch.testing.assert_close(p.double(), softmax64(logits, spec, bias), rtol=PROB_RTOL, atol=0)
    assert not torch.allclose(p, refusal_probs(logits, spec, backend=backend)), "bias had no effect"


@pytest.mark.parametrize("backend", BACKENDS)
def test_refusal_probs_nan_on_invalid_rows(backend):
    logits, spec = probs_case(3, 111, 2, torch.float32, seed=5)
    logits[1, 50] = float("nan")
    logits[2] = NEG_INF
    p = refusal_probs(logits, spec, backend=backend)
    assert torch.isnan(p[1:]).all()
    torch.testing.assert_close(p[:1].double(), softmax64(logits[:1], spec), rtol=PROB_RTOL, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scoring_and_sampling_probabilities_agree_to_the_bit(backend):
    # calibration scores with refusal_probs; the engine decides with refusal_sample (zero bias): a
    # threshold set to a prompt's own score must refuse that prompt
    for seed, (b, v, c) in enumerate([(64, 111, 1), (64, 2000, 3), (16, 49158, 5)]):
        logits, spec = probs_case(b, v, c, torch.float32, seed=seed)
        scores = refusal_probs(logits, spec, backend=backend)
        ctl = RefusalControls.build(b, c, DEVICE, thresholds=scores.max(1, keepdim=True).values.expand(b, c),
                                    first_step=True)
        res = refusal_sample(logits, spec, ctl, backend=backend)
        assert torch.equal(res.refusal_probs, scores)
        assert (res.refused >= 0).all()


# --------------------------------------------------------------------------------------------------
# 4. apply_refusal_ makes a downstream sampler take the same decision.

def apply_case(b, v, c, respond, dtype, seed, *, bias, mask, temperature):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(v, generator=gen)
    spec = RefusalSpec(perm[:c].tolist(), int(perm[c]) if respond else None)
    ctl = list(spec.control_ids)
    z = torch.randn(b, v, generator=gen) * 2
    # Control tokens near the top of every row, so a rule that forgot to mask them changes argmax and
    # shows up in the draws.
    z[:, ctl] = z.max(1, keepdim=True).values + torch.rand(b, len(ctl), generator=gen) * 4 - 1
    vocab_mask = None
    if mask:
        allowed = torch.rand(b, v, generator=gen) < 0.5
        ordinary = z.clone()
        ordinary[:, ctl] = NEG_INF
        allowed[torch.arange(b), ordinary.argmax(1)] = False  # the unmasked argmax must not survive
        allowed[torch.arange(b), torch.randint(0, v, (b,), generator=gen)] = True
        allowed[:, ctl] = torch.rand(b, len(ctl), generator=gen) < 0.5  # must not matter: rules govern them
        vocab_mask = pack_vocab_mask(allowed)
    modes = torch.tensor([0, 1, 2], dtype=torch.int32)[torch.arange(b) % 3]
    first = (torch.arange(b) // 3) % 2 == 0
    thresholds = torch.rand(b, c, generator=gen) * 0.5
    thresholds[6:9] = 1.5  # above any probability and any sum: these first-step rows never refuse
    controls = RefusalControls.build(
        b, c, DEVICE, thresholds=thresholds,
        logit_bias=(torch.randn(b, c, generator=gen) * 2) if bias else 0.0, mode=modes,
        temperature=temperature, first_step=first, seed=torch.randint(0, 2**40, (b,), generator=gen),
        position=torch.arange(b) * 11, vocab_mask=vocab_mask)
    z[b - 1, 7] = float("nan")  # one invalid row, reported and left alone
    return z.to(dtype).to(DEVICE), spec, controls


def allowed_by_rules(logits, spec, controls, decided):
    """[B, V] bool: what the contract lets a row emit, from the refusal_sample decision alone."""
    b, v = logits.shape
    ctl = list(spec.control_ids)
    allowed = torch.ones(b, v, dtype=torch.bool, device=logits.device)
    if controls.vocab_mask is not None:
        allowed = unpack_vocab_mask(controls.vocab_mask, v)
    free_first = controls.first_step & (controls.mode == 2)
    allowed[:, ctl] = free_first[:, None]
    forced = forced_rows(spec, controls, decided)
    one_hot = torch.zeros_like(allowed)
    one_hot[torch.arange(b), decided.tokens.clamp_min(0)] = True
    return torch.where(forced[:, None], one_hot, allowed), forced, free_first


def forced_rows(spec, controls, decided):
    refusing = decided.refused >= 0
    answering = torch.full_like(refusing, spec.respond_id is not None)
    return (decided.tokens >= 0) & controls.first_step & (controls.mode != 2) & (refusing | answering)


APPLY_CASES = [  # (C, respond, dtype, bias, mask)
    (1, True, torch.float32, True, False),
    (3, True, torch.float32, True, True),
    (3, False, torch.float32, True, True),
    (2, False, torch.bfloat16, False, True),  # no bias: it is added in bf16 in place, in fp32 by the sampler
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c,respond,dtype,bias,mask", APPLY_CASES)
def test_apply_refusal_greedy_argmax_matches_refusal_sample(backend, c, respond, dtype, bias, mask):
    b, v = 18, 150
    logits, spec, controls = apply_case(b, v, c, respond, dtype, seed=10 * c + respond,
                                        bias=bias, mask=mask, temperature=0.0)
    original = logits.clone()
    decided = refusal_sample(original, spec, controls, backend=backend)
    # A view with a row stride: the rewrite must land in the caller's storage and nowhere else.
    storage = torch.full((b, v + 5), 7.0, dtype=dtype, device=DEVICE)
    view = storage[:, :v]
    view.copy_(logits)
    ptr = view.data_ptr()
    res = apply_refusal_(view, spec, controls, backend=backend)
    assert view.data_ptr() == ptr and view.dtype == dtype
    assert (storage[:, v:] == 7.0).all()

    valid = decided.tokens >= 0
    assert not valid[-1] and valid[:-1].all()
    assert torch.equal(view.argmax(1)[valid], decided.tokens[valid])

    allowed, forced, free_first = allowed_by_rules(original, spec, controls, decided)
    # The case must exercise every rule, or the comparisons above prove little.
    refusing = forced & (decided.refused >= 0)
    assert refusing.any() and (~controls.first_step).any() and (free_first & valid).any()
    assert (forced & ~refusing).any() == respond
    assert (controls.first_step & (controls.mode != 2) & ~forced & valid).any() != respond

    # Forced rows are one-hot at 0; others keep their logits where allowed and -inf elsewhere.
    expect = torch.where(allowed, original, torch.tensor(NEG_INF, dtype=dtype, device=DEVICE))
    expect[forced] = torch.where(allowed[forced], 0.0, NEG_INF).to(dtype)
    rid = list(spec.refusal_ids)
    biased = (original[:, rid].float() + controls.logit_bias).to(dtype)
    expect[:, rid] = torch.where(free_first[:, None] & ~forced[:, None], biased, expect[:, rid])
    # The invalid row is not forced: it keeps its NaN (unless masked) for the downstream sampler to see.
    torch.testing.assert_close(view, expect, rtol=0, atol=0, equal_nan=True)

    assert torch.equal(res.tokens, torch.where(forced, decided.tokens, -1))
    assert torch.equal(res.refused[~free_first], decided.refused[~free_first])
    assert res.refused[-1] == -2
    torch.testing.assert_close(res.refusal_probs[valid], decided.refusal_probs[valid], rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_refusal_keeps_biased_fp16_logits_finite(backend):
    # 1e5 overflows fp16: written as +inf it would turn a valid row invalid downstream (softmax NaN),
    # as -inf it would mask a token; saturated, the decision is the one refusal_sample takes
    logits = good_logits(torch.float16)
    logits[:, 9] = NEG_INF
    ctl = good_controls(mode="free", first_step=True, temperature=0.0,
                        logit_bias=torch.tensor([[1e5, -1e5]], device=DEVICE).expand(B, C))
    want = refusal_sample(logits.clone(), SPEC, ctl, backend=backend)
    res = apply_refusal_(logits, SPEC, ctl, backend=backend)
    big = torch.finfo(torch.float16).max
    assert (res.refused == -1).all() and (logits[:, 3] == big).all() and (logits[:, 5] == -big).all()
    assert (logits[:, 9] == NEG_INF).all() and not torch.isnan(torch.softmax(logits.float(), 1)).any()
    assert torch.equal(logits.argmax(1), want.tokens) and (want.refused == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_refusal_sampled_rows_never_draw_forbidden_tokens(backend):
    b, v, temp = 18, 150, 0.8
    logits, spec, controls = apply_case(b, v, 3, True, torch.float32, seed=21, bias=True, mask=True,
                                        temperature=temp)
    decided = refusal_sample(logits, spec, controls, backend=backend)
    allowed, forced, free_first = allowed_by_rules(logits, spec, controls, decided)
    rewritten = logits.clone()
    apply_refusal_(rewritten, spec, controls, backend=backend)
    valid = decided.tokens >= 0
    probs = torch.softmax(rewritten[valid].float() / temp, 1)
    draws = torch.multinomial(probs.cpu(), 400, replacement=True, generator=torch.Generator().manual_seed(22))
    ok = allowed[valid].cpu().gather(1, draws)
    assert ok.all(), f"rows {valid.nonzero()[:, 0][~ok.all(1)].tolist()} drew tokens the rules forbid"
    assert (draws[forced[valid].cpu()] == decided.tokens[valid & forced].cpu()[:, None]).all()
    # The control tokens sit near the top, so free rows must actually draw them: not over-masked.
    ctl = torch.tensor(spec.control_ids)
    assert torch.isin(draws[free_first[valid].cpu()], ctl).any()


# --------------------------------------------------------------------------------------------------
# 5. torch.compile traces around the custom op; opcheck validates its registration.

def compile_case():
    gen = torch.Generator().manual_seed(30)
    spec = RefusalSpec([3, 5, 60], 7)
    logits = torch.randn(6, 100, generator=gen).to(DEVICE)
    logits[:, [3, 5, 60]] += torch.rand(6, 3, generator=gen) * 6
    controls = RefusalControls.build(
        6, 3, DEVICE, thresholds=0.05, temperature=torch.tensor([0.0, 0.7, 1.0, 1.3, 0.0, 0.9]),
        first_step=torch.tensor([True, True, False, False, True, True]),
        mode=["category", "sum", "category", "free", "free", "category"], seed=torch.arange(6) + 100,
        vocab_mask=pack_vocab_mask(torch.rand(6, 100, generator=gen) < 0.7))
    return logits, spec, controls


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    logits, spec, controls = compile_case()

    def fn(x, out):
        # Work before and after the sampler, so the op must sit inside a real graph.
        res = rtkern.refusal_sample(x * 1.25, spec, controls, out=out, backend=backend)
        probs = rtkern.refusal_probs(x, spec, backend=backend)
        return res.tokens + 1, res.refusal_probs * 2, res.refused, probs

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out_c, out_e = SampleOutput.empty(6, 3, DEVICE), SampleOutput.empty(6, 3, DEVICE)
    got, want = compiled(logits, out_c), fn(logits, out_e)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    for g, w in zip(out_c, out_e):  # out= buffers passed into the graph are filled in place
        assert torch.equal(g, w)
    assert (want[2] >= 0).any() and (want[2] == -1).any()


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck is unavailable")
@pytest.mark.parametrize("with_mask", [False, True])
def test_custom_op_passes_opcheck(with_mask):
    logits, spec, controls = compile_case()
    out = SampleOutput.empty(6, 3, DEVICE)
    args = (logits, spec.ids_tensor(DEVICE), spec.num_categories, controls.thresholds, controls.logit_bias,
            controls.mode, controls.temperature, controls.first_step, controls.seed, controls.position,
            controls.vocab_mask if with_mask else None, out.tokens, out.refusal_probs, out.refused, False)
    torch.library.opcheck(torch.ops.rtkern.refusal_sample.default, args)
    # opcheck works on copies; through the dispatcher the op fills the caller's buffers like the public API.
    torch.ops.rtkern.refusal_sample(*args)
    ref = refusal_sample(logits, spec, controls if with_mask else dataclasses.replace(controls, vocab_mask=None),
                         backend="triton")
    assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.refused, ref.refused)


# --------------------------------------------------------------------------------------------------
# 6. RefusalSpec.from_tokenizer finds the control tokens however the checkpoint spells them.

class StubTokenizer:
    """Only what from_tokenizer uses: get_vocab()."""

    def __init__(self, strings):
        self._vocab = {s: i for i, s in enumerate(strings)}

    def get_vocab(self):
        return dict(self._vocab)


FILLER = ["a", "b", "hello", "Ġworld", "▁the", "[UNK]"]


def _hf_tokenizer(special=(), plain=()):
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.WordLevel({s: i for i, s in enumerate(FILLER)}, unk_token="[UNK]"))
    tok.add_special_tokens(list(special))
    tok.add_tokens(list(plain))  # the paper checkpoints' tokens are ordinary added tokens: " [refuse]"
    return tok


def _expect(tok, strings, respond):
    vocab = tok.get_vocab()
    return [vocab[s] for s in strings], (vocab[respond] if respond is not None else None)


@pytest.mark.parametrize("prefix", ["", " ", "Ġ", "▁"], ids=["special", "space", "byte-level", "sentencepiece"])
def test_from_tokenizer_single(prefix):
    tok = StubTokenizer(FILLER + [prefix + "[refuse]", prefix + "[respond]"])
    spec = RefusalSpec.from_tokenizer(tok, "single")
    ids, respond = _expect(tok, [prefix + "[refuse]"], prefix + "[respond]")
    assert spec.refusal_ids == tuple(ids) and spec.respond_id == respond and spec.names == ("refuse",)


@pytest.mark.parametrize("paper", [False, True])
def test_from_tokenizer_with_hf_tokenizers(paper):
    p = " " if paper else ""
    strings = [p + "[refuse]", p + "[respond]"]
    tok = _hf_tokenizer(plain=strings) if paper else _hf_tokenizer(special=strings)
    spec = RefusalSpec.from_tokenizer(tok, "single")
    ids, respond = _expect(tok, strings[:1], strings[1])
    assert spec.refusal_ids == tuple(ids) and spec.respond_id == respond
    assert spec.refusal_ids[0] >= len(FILLER) and spec.respond_id >= len(FILLER)


@pytest.mark.parametrize("spelling", ["special", "paper", "byte-level"])
def test_from_tokenizer_category(spelling):
    strings = [f"[{c}]" for c in CATEGORIES]
    if spelling == "paper":
        strings = [" " + s for s in strings]
    elif spelling == "byte-level":  # inner spaces are spelled Ġ as well
        strings = ["Ġ" + s.replace(" ", "Ġ") for s in strings]
    # Vocabulary order unlike category order, so a spec that followed the vocabulary would be wrong.
    tok = StubTokenizer(FILLER + strings[::-1][:2] + ["[respond]"] + strings[::-1][2:])
    spec = RefusalSpec.from_tokenizer(tok, "category", require_respond=True)
    ids, respond = _expect(tok, strings, "[respond]")
    assert spec.refusal_ids == tuple(ids) and spec.respond_id == respond
    assert spec.names == tuple(CATEGORIES) and spec.num_categories == 5


def test_from_tokenizer_category_with_hf_paper_tokens():
    strings = [f" [{c}]" for c in CATEGORIES]
    tok = _hf_tokenizer(plain=strings)
    spec = RefusalSpec.from_tokenizer(tok, "category")
    assert spec.refusal_ids == tuple(_expect(tok, strings, None)[0]) and spec.respond_id is None


def test_from_tokenizer_prefers_the_exact_string():
    tok = StubTokenizer(FILLER + [" [refuse]", "[refuse]", "Ġ[refuse]"])
    assert RefusalSpec.from_tokenizer(tok).refusal_ids == (tok.get_vocab()["[refuse]"],)


def test_from_tokenizer_missing_tokens_are_named():
    strings = [f"[{c}]" for c in CATEGORIES if c != "Unsupported requests"]
    tok = StubTokenizer(FILLER + strings + ["[respond]"])
    with pytest.raises(ValueError,
                       match=re.escape("no control tokens ['[Unsupported requests]'] for scheme 'category'")):
        RefusalSpec.from_tokenizer(tok, "category")
    with pytest.raises(ValueError, match=re.escape("no control tokens ['[refuse]'] for scheme 'single'")):
        RefusalSpec.from_tokenizer(StubTokenizer(FILLER), "single")
    # "[refuse ]" or a bare "refuse" is a different token, not a spelling of "[refuse]".
    with pytest.raises(ValueError, match=r"no control tokens"):
        RefusalSpec.from_tokenizer(StubTokenizer(FILLER + ["refuse", "[refuse ]", "Ġrefuse"]), "single")


def test_from_tokenizer_respond_is_optional_unless_required():
    tok = StubTokenizer(FILLER + ["[refuse]"])
    assert RefusalSpec.from_tokenizer(tok).respond_id is None
    with pytest.raises(ValueError, match=re.escape("tokenizer has no '[respond]' token")):
        RefusalSpec.from_tokenizer(tok, require_respond=True)


def test_from_tokenizer_unknown_scheme():
    with pytest.raises(ValueError, match=r"scheme must be 'single' or 'category', got 'multi'"):
        RefusalSpec.from_tokenizer(StubTokenizer(FILLER + ["[refuse]"]), "multi")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_apply_refusal_reports_rows_with_no_allowed_token_like_refusal_sample(backend):
    spec = RefusalSpec([10, 11])
    logits = torch.randn(2, 100)
    allowed = torch.ones(2, 100, dtype=torch.bool)
    allowed[1] = False
    ctl = RefusalControls.build(2, 2, thresholds=2.0, vocab_mask=pack_vocab_mask(allowed))
    want = refusal_sample(logits.clone(), spec, ctl, backend=backend)
    got = apply_refusal_(logits, spec, ctl, backend=backend)
    assert want.refused.tolist() == got.refused.tolist() == [-1, -2]
    assert got.tokens[1].item() == -1


@pytest.mark.skipif(not ON_GPU, reason="backend=None picks the kernel only on CUDA")
def test_default_backend_falls_back_to_torch_beyond_the_kernels_vocabulary():
    # the kernel carries tile argmax ids as float32 (exact below 2**24); the default must not pick it
    v = (1 << 24) + 8
    logits = torch.full((1, v), -5.0, device=DEVICE)
    logits[0, v - 3] = 10.0
    res = refusal_sample(logits, RefusalSpec([0]), RefusalControls.build(1, 1, DEVICE, temperature=0.0))
    assert int(res.tokens) == v - 3
    with pytest.raises(ValueError, match="the Triton sampler supports V < 16777216"):
        refusal_sample(logits, RefusalSpec([0]), RefusalControls.build(1, 1, DEVICE), backend="triton")


# --------------------------------------------------------------------------------------------------
# 7. Layout and boundary cases pinned by hand (found by mutation testing: both backends read the same
#    packed words and share one decision, so comparing them with each other cannot catch these).

def test_vocab_mask_bit_layout_is_lsb_first():
    # DESIGN: bit i of word w allows token 32w + i (xgrammar's layout). The kernel and the reference
    # both read the packed words, so a pack that wrote bits in another order would pass every
    # kernel-vs-reference comparison: the expected words are written out here.
    allowed = torch.zeros(3, 40, dtype=torch.bool)
    allowed[0, [0, 5, 31]] = True
    allowed[1, [32, 39]] = True           # word 1, bits 0 and 7
    allowed[2, 31] = True                 # bit 31 alone: the int32 sign bit
    words = [[1 + 2**5 - 2**31, 0], [0, 1 + 2**7], [-2**31, 0]]
    packed = pack_vocab_mask(allowed)
    assert packed.dtype == torch.int32 and packed.tolist() == words
    assert torch.equal(unpack_vocab_mask(torch.tensor(words, dtype=torch.int32), 40), allowed)


def test_default_category_names():
    # RefusalSpec's documented defaults; calibration reports and the CLI print these names
    assert RefusalSpec([3]).names == ("refuse",)
    assert RefusalSpec([3, 9, 4], 5).names == ("category_0", "category_1", "category_2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_mode_refuses_when_the_sum_equals_the_threshold(backend):
    # Rule 2, sum mode: refuse if sum_c p_c >= thresholds[0]. A threshold equal to a prompt's own
    # summed score (as calibration sets it) must refuse that prompt; the next float up must not.
    b = 8
    logits, spec = probs_case(b, 111, 2, torch.float32, seed=6)
    scores = refusal_probs(logits, spec, backend=backend)
    total = scores[:, 0] + scores[:, 1]               # two terms: the same float32 sum in any order
    other = torch.full_like(total, 9.0)               # sum mode reads column 0 only
    ctl = RefusalControls.build(b, 2, DEVICE, mode="sum", thresholds=torch.stack([total, other], 1))
    res = refusal_sample(logits, spec, ctl, backend=backend)
    assert torch.equal(res.refusal_probs, scores)
    assert torch.equal(res.refused, scores.argmax(1).int())
    assert torch.equal(res.tokens, torch.tensor(spec.refusal_ids, device=DEVICE)[scores.argmax(1)])
    above = torch.nextafter(total, torch.full_like(total, 2.0))
    ctl.update_(thresholds=torch.stack([above, other], 1))
    assert (refusal_sample(logits, spec, ctl, backend=backend).refused == -1).all()


# (seed, position 0) pairs whose row_uniform draw is exactly 0 and exactly 1 - 2**-24 (found by search)
U_ZERO_SEED, U_TOP_SEED = 19389801, 49214909


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_uniform_draws_take_the_first_and_last_allowed_tokens(backend):
    # Inverting the CDF at u = 0 must land on the first token with weight, not on token 0 when that
    # one is masked or at -inf; at the largest u, on the last allowed token in the sampler's order
    # (ordinary tokens by id, then the control tokens in spec order).
    from rtkern.reference import row_uniform
    seeds = torch.tensor([U_ZERO_SEED, U_TOP_SEED])
    assert row_uniform(seeds, torch.zeros(2, dtype=torch.int64)).tolist() == [0.0, 1 - 2**-24]
    spec = RefusalSpec([3, 5], respond_id=2)
    z = torch.zeros(5, V)
    z[1, 0] = NEG_INF                   # allowed, but no weight
    z[3, 38:] = NEG_INF
    allowed = torch.ones(5, V, dtype=torch.bool)
    allowed[0, :2] = False
    allowed[2, 37:] = False
    controls = RefusalControls.build(
        5, 2, DEVICE, seed=torch.tensor([U_ZERO_SEED] * 2 + [U_TOP_SEED] * 3),
        first_step=torch.tensor([False, False, False, False, True]), mode="free",
        vocab_mask=pack_vocab_mask(allowed))
    out = refusal_sample(z.to(DEVICE), spec, controls, backend=backend)
    # row 4: free first step, the controls come last in the order: respond (id 2) is the very last
    assert out.tokens.tolist() == [4, 1, 36, 37, 2]
    assert out.refused.tolist() == [-1] * 5


@pytest.mark.skipif(ON_GPU, reason="on CUDA the default is the kernel")
def test_default_backend_off_cuda_is_the_reference(monkeypatch):
    """backend=None never runs the Triton interpreter on CPU tensors, even with TRITON_INTERPRET=1."""
    def launched(*args, **kwargs):
        raise AssertionError("the Triton kernel ran for CPU logits with backend=None")
    monkeypatch.setattr(sampler_mod, "refusal_sample_launch_prechecked", launched)
    logits = good_logits()
    want = torch.softmax(logits.double(), 1)[:, [3, 5]]
    out = refusal_sample(logits, SPEC, good_controls(temperature=0.0))
    torch.testing.assert_close(out.refusal_probs.double(), want, rtol=PROB_RTOL, atol=0)
    torch.testing.assert_close(refusal_probs(logits, SPEC).double(), want, rtol=PROB_RTOL, atol=0)
    apply_refusal_(logits.clone(), SPEC, good_controls())


def test_triton_backend_vocabulary_limit_is_exclusive(no_launch):
    """V = 2**24 - 1 passes the checks (and reaches the launch); V = 2**24 is refused before it."""
    spec = RefusalSpec([0])
    for v in ((1 << 24) - 1, 1 << 24):
        logits = torch.zeros(1, v, dtype=torch.float16, device=DEVICE)
        controls = RefusalControls.build(1, 1, DEVICE)
        if v < (1 << 24):
            with pytest.raises(AssertionError, match="before the bad input"):
                refusal_sample(logits, spec, controls, backend="triton")
        else:
            with pytest.raises(ValueError, match="the Triton sampler supports V < 16777216, got V=16777216"):
                refusal_sample(logits, spec, controls, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out,match", [
    (_out()._replace(tokens=torch.empty(2 * B, dtype=torch.int64, device=DEVICE)[::2]),
     r"out.tokens must be a contiguous torch.int64 tensor of shape \[2\]"),
    (_out()._replace(refusal_probs=torch.empty(C, B, device=DEVICE).t()),
     r"out.refusal_probs must be a contiguous torch.float32 tensor of shape \[2, 2\]"),
    # "meta" stands in for a second device: the check compares devices and never reads the values.
    (_out()._replace(refused=torch.empty(B, dtype=torch.int32, device="meta")),
     r"out.refused must be a contiguous torch.int32 tensor of shape \[2\] on .*got torch.int32 \[2\] on meta"),
], ids=["tokens strided", "probs transposed", "refused on meta"])
def test_out_must_be_contiguous_and_on_the_logits_device(no_launch, backend, out, match):
    with pytest.raises(ValueError, match=match):
        refusal_sample(good_logits(), SPEC, good_controls(), out=out, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refusal_probs_rejects_a_logit_bias_on_another_device(no_launch, backend):
    with pytest.raises(ValueError, match=r"logit_bias must be float32 \[2, 2\] on .*got torch.float32 \[2, 2\] on meta"):
        refusal_probs(good_logits(), SPEC, logit_bias=torch.zeros(B, C, device="meta"), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_refusal_forces_nothing_on_an_invalid_first_step_row(backend):
    """A NaN row at the first step with a [respond] token: invalid (-2, token -1), not "answer"."""
    logits = good_logits()
    logits[0, 0] = float("nan")
    ctl = good_controls(thresholds=2.0)                   # never refuse: valid first-step rows answer
    want = refusal_sample(logits.clone(), SPEC, ctl, backend=backend)
    res = apply_refusal_(logits, SPEC, ctl, backend=backend)
    assert want.tokens.tolist() == res.tokens.tolist() == [-1, 7]
    assert want.refused.tolist() == res.refused.tolist() == [-2, -1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_refusal_bias_keeps_a_masked_refusal_token_masked(backend):
    """A -inf refusal logit in a first-step free row stays -inf under a positive bias (only finite
    logits saturate), so no sampler can draw a token the model ruled out."""
    logits = good_logits()
    logits[:, 3] = NEG_INF
    ctl = good_controls(mode="free", first_step=True, logit_bias=5.0)
    expect5 = logits[:, 5] + 5.0
    res = apply_refusal_(logits, SPEC, ctl, backend=backend)
    assert (res.refused == -1).all() and (res.tokens == -1).all()
    assert torch.isneginf(logits[:, 3]).all()
    torch.testing.assert_close(logits[:, 5], expect5, rtol=0, atol=0)


def test_remembered_out_check_sees_requires_grad_switched_on(no_launch):
    """The same `out`, checked once, then its refusal_probs made to require grad in place: re-checked."""
    out = _out()
    with pytest.raises(AssertionError, match="before the bad input"):      # passes the checks
        refusal_sample(good_logits(), SPEC, good_controls(), out=out, backend="torch")
    out.refusal_probs.requires_grad_()
    with pytest.raises(ValueError, match=r"out.refusal_probs is written in place: it must not require grad"):
        refusal_sample(good_logits(), SPEC, good_controls(), out=out, backend="torch")


@pytest.mark.skipif(not ON_GPU, reason="backend=None picks the kernel only on CUDA")
def test_default_backend_switches_to_torch_exactly_at_the_kernels_limit(monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("the kernel ran")
    monkeypatch.setattr(sampler_mod, "refusal_sample_launch_prechecked", launched)
    spec, controls = RefusalSpec([0]), RefusalControls.build(1, 1, DEVICE, temperature=0.0)
    with pytest.raises(AssertionError, match="the kernel ran"):                  # V = 2**24 - 1: the kernel
        refusal_sample(torch.zeros(1, (1 << 24) - 1, device=DEVICE), spec, controls)
    logits = torch.zeros(1, 1 << 24, device=DEVICE)                             # V = 2**24: the reference
    logits[0, 5] = 1.0
    assert refusal_sample(logits, spec, controls).tokens.tolist() == [5]
