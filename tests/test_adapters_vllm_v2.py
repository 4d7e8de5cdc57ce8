"""rtkern.adapters.vllm_v2 without vLLM: the per-slot state and the first-row rule of Model Runner V2.

`RefusalSlotState` reads only ``SamplingParams.extra_args``; `RefusalLogitsProcessorV2` reads
``req_states.{device, max_num_reqs, prompt_len}`` and ``ctx.{expanded_idx_mapping, pos}``. The tests
drive both with plain objects of that shape and compare each row with what rtkern does to it alone.
"""
from types import SimpleNamespace

import pytest
import torch

from rtkern.adapters import vllm as rv
from rtkern.adapters import vllm_v2
from test_adapters_vllm import NAMES, RESPOND, SPEC, make_logits, masked, one_row, params

# (extra_args, what one_row gets for it)
REQUESTS = [
    ({}, {}),
    ({"refusal_thresholds": {NAMES[2]: 0.01}}, dict(thresholds=[0.5, 0.5, 0.01])),
    ({"refusal_mode": "sum", "refusal_thresholds": 0.05}, dict(mode="sum", thresholds=0.05)),
    ({"refusal_mode": "free", "refusal_logit_bias": [0.0, 4.0, 0.0]}, dict(mode="free", logit_bias=[0.0, 4.0, 0.0])),
    ({"refusal_thresholds": 2.0}, dict(thresholds=2.0)),
    ({"refusal_thresholds": 0.0}, dict(thresholds=0.0)),
]


def _state(**kw):
    st = rv.RefusalSlotState(SPEC, 8, backend="torch", **kw)
    for slot, (extra, _) in enumerate(REQUESTS):
        assert st.add(slot, params(**extra)) is True
    return st


def _expected(z, slots, first):
    rows = []
    for r, (s, f) in enumerate(zip(slots, first)):
        rows.append(one_row(z[r], **REQUESTS[s][1])[0] if f else masked(z[r]))
    return torch.stack(rows)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_first_rows_decide_and_every_other_row_is_masked(backend):
    st = _state()
    st.backend = backend
    slots = [3, 0, 5, 1, 2, 0, 4, 1]          # shuffled rows; slots 0 and 1 twice (draft rows)
    first = [True, True, True, True, True, False, True, False]
    z = make_logits(len(slots), seed=3)
    got = st.apply(z.clone(), torch.tensor(slots), torch.tensor(first))
    torch.testing.assert_close(got, _expected(z, slots, first))
    out = st.last_output
    assert out.tokens.shape == (8,) and (out.tokens[torch.tensor(first).logical_not()] == -1).all()
    assert out.tokens[2] in (40, 41, 42) and out.tokens[6] == RESPOND   # thresholds 0 refuses; 2.0 never does
    assert torch.isfinite(got[[5, 7], :40]).all()   # rows past the first position keep their distribution


def test_staged_writes_reach_the_device_on_flush_and_slots_are_recycled():
    st = _state()
    z = make_logits(1, seed=4)
    assert st.apply(z.clone(), torch.tensor([5]), torch.tensor([True]))[0].argmax() != RESPOND
    st.add(5, params(refusal_thresholds=2.0))                      # a new request takes slot 5
    assert float(st.thresholds[5, 0]) == 0.0                       # staged, not yet written
    st.flush()
    assert st.thresholds[5].tolist() == [2.0, 2.0, 2.0]
    assert st.apply(z.clone(), torch.tensor([5]), torch.tensor([True]))[0].argmax() == RESPOND
    st.add(5, params(refusal_thresholds=0.0))
    # apply flushes what is still staged: a runner that skipped apply_staged_writes still gets it right
    assert st.apply(z.clone(), torch.tensor([5]), torch.tensor([True]))[0].argmax() != RESPOND


def test_structured_output_requests_are_not_decided():
    # as in test_adapters_vllm: the grammar's mask came first; the row keeps the grammar's tokens
    st = rv.RefusalSlotState(SPEC, 4, thresholds=0.0, backend="torch")
    st.add(0, SimpleNamespace(extra_args=None, structured_outputs=object()))
    st.add(1, params())
    z = make_logits(2, seed=5)
    z[0, 5:] = float("-inf")
    got = st.apply(z.clone(), torch.tensor([0, 1]), torch.tensor([True, True]))
    torch.testing.assert_close(got[0], z[0])
    assert st.last_output.tokens[0] == -1 and st.last_output.tokens[1] in (40, 41, 42)
    st.add(0, params())                              # the slot's next request is decided again
    st.apply(z[:1].clone(), torch.tensor([0]), torch.tensor([True]))
    assert st.last_output.tokens[0] in (40, 41, 42)


def test_bad_arguments_fall_back_to_the_defaults(caplog):
    st = rv.RefusalSlotState(SPEC, 2, thresholds=2.0, backend="torch")
    st.add(0, params(refusal_thresholds={"Harmful": 0.0}))
    assert "ignoring bad refusal arguments of slot 0" in caplog.text
    assert st.apply(make_logits(1), torch.tensor([0]), torch.tensor([True]))[0].argmax() == RESPOND


def test_other_dtypes_and_layouts_are_written_back():
    st = _state()
    z = make_logits(4, seed=5).double()
    slots, first = [0, 1, 2, 3], [True, False, True, True]
    got = st.apply(z.clone(), torch.tensor(slots), torch.tensor(first))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.float(), _expected(z.float(), slots, first))
    wide = make_logits(4, seed=6).t().contiguous().t()              # column-major rows
    torch.testing.assert_close(st.apply(wide.clone(), torch.tensor(slots), torch.tensor(first)),
                               _expected(wide, slots, first))


@pytest.mark.parametrize("call,exc,match", [
    (lambda st: st.add(-1, params()), ValueError, r"slot must be a persistent-batch row \(an int >= 0\), got -1"),
    (lambda st: st.add(8, params()), ValueError, r"slot must be < num_slots=8, got 8"),
    (lambda st: st.add(True, params()), ValueError, r"slot must be"),
    (lambda st: st.apply(make_logits(2), torch.tensor([0]), torch.tensor([True, True])), ValueError,
     r"slots and first must be \[2\], got \[1\] and \[2\]"),
    (lambda st: st.apply(torch.zeros(2, 40), torch.tensor([0, 1]), torch.tensor([True, True])), ValueError, "43"),
    (lambda st: st.apply(torch.zeros(2, 64, dtype=torch.int64), torch.tensor([0, 1]), torch.tensor([True, True])),
     TypeError, "floating"),
])
def test_bad_slots_and_logits_are_rejected(call, exc, match):
    with pytest.raises(exc, match=match):
        call(_state())


def test_bad_construction_is_rejected():
    with pytest.raises(ValueError, match="num_slots must be a positive int, got 0"):
        rv.RefusalSlotState(SPEC, 0)
    with pytest.raises(TypeError, match="RefusalSpec"):
        rv.RefusalSlotState([1, 2], 4)
    with pytest.raises(ValueError, match=">= 0"):
        rv.RefusalSlotState(SPEC, 4, thresholds=-1.0)
    with pytest.raises(ValueError, match="backend"):
        rv.RefusalSlotState(SPEC, 4, backend="cuda")


def _req_states(prompt_len, wrap):
    t = torch.tensor(prompt_len, dtype=torch.int32)
    return SimpleNamespace(device=torch.device("cpu"), max_num_reqs=len(prompt_len),
                           prompt_len=SimpleNamespace(gpu=t, np=t.numpy()) if wrap else t)


@pytest.mark.parametrize("wrap", [True, False], ids=["gpu-runner-buffer", "cpu-runner-tensor"])
def test_processor_finds_first_rows_from_positions_and_prompt_lengths(monkeypatch, wrap):
    monkeypatch.setattr(vllm_v2, "HAVE_VLLM_V2", True)
    proc = rv.make_logits_processor(SPEC, runner="v2", backend="torch")(None, _req_states([5, 9, 3, 7], wrap))
    for slot, (extra, _) in enumerate(REQUESTS[:4]):
        assert proc.add_request(slot, params(**extra)) is True
    proc.apply_staged_writes()
    # slot 0 at its first output (pos 4 of a 5-token prompt); slot 1 mid chunked prefill (pos 5 of 9);
    # slot 2 decoding (pos 6 > 3); slot 3 at its first output; slot 1 again: its last prompt token
    slots, pos = [0, 1, 2, 3, 1], [4, 5, 6, 6, 8]
    ctx = SimpleNamespace(expanded_idx_mapping=torch.tensor(slots, dtype=torch.int32), pos=torch.tensor(pos))
    z = make_logits(5, seed=7)
    got = proc.apply(z.clone(), ctx)
    torch.testing.assert_close(got, _expected(z, slots, [True, False, False, True, True]))


def test_processor_needs_vllm_and_factory_picks_the_runner():
    if rv.HAVE_VLLM_V2:
        pytest.skip("vLLM is installed: construction is vLLM's business")
    with pytest.raises(ImportError, match="needs vLLM >= 0.33"):
        rv.RefusalLogitsProcessorV2(None, _req_states([1], True))
    with pytest.raises(ImportError, match="only Model Runner V2: use rtkern.adapters.vllm:RefusalLogitsProcessorV2"):
        with pytest.MonkeyPatch.context() as m:   # a vLLM with the V2 interface only (0.34)
            m.setattr(rv, "HAVE_VLLM_V2", True)
            rv.RefusalLogitsProcessor(None, torch.device("cpu"), False)
    v2 = rv.make_logits_processor(SPEC, runner="v2", thresholds={NAMES[0]: 1.5})
    assert issubclass(v2, rv.RefusalLogitsProcessorV2) and v2.spec is SPEC and v2.__name__.endswith("V2")
    assert issubclass(rv.make_logits_processor(SPEC), rv.RefusalLogitsProcessor)   # no vLLM: the v1 class
    with pytest.raises(ValueError, match="runner must be 'v1', 'v2' or None, got 'v3'"):
        rv.make_logits_processor(SPEC, runner="v3")
    assert v2.validate_params(params(refusal_thresholds={NAMES[1]: 0.2})) is None
    with pytest.raises(ValueError, match="unknown category"):
        v2.validate_params(params(refusal_thresholds={"Harmful": 0.2}))
