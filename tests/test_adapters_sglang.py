"""rtkern.adapters.sglang: first-position detection, per-request arguments, masking, and (where SGLang
imports) SGLang's own base class and serialisation."""
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from rtkern.adapters import sglang as rs
from test_adapters_vllm import NAMES, REFUSE, SPEC, make_logits, masked, one_row


def req(*output_ids, **custom):
    """A request's custom_params as SGLang hands them over: the user's dict plus "__req__"."""
    return {**custom, "__req__": SimpleNamespace(output_ids=list(output_ids))}


def test_first_rows_decide_and_other_rows_are_masked():
    proc = rs.make_logit_processor(SPEC, thresholds=0.04)()
    params = [req(), req(refusal_thresholds={NAMES[1]: 0.0}), req(5, 6), req(refusal_mode="free")]
    z = make_logits(4)
    got = proc(z.clone(), params)
    torch.testing.assert_close(got[0], one_row(z[0], thresholds=0.04)[0])
    row1, res1 = one_row(z[1], thresholds=[0.04, 0.0, 0.04])
    torch.testing.assert_close(got[1], row1)
    assert int(res1.refused) >= 0 and got[1].argmax() == REFUSE[int(res1.refused)]
    torch.testing.assert_close(got[2], masked(z[2]))                 # already has output tokens
    torch.testing.assert_close(got[3], one_row(z[3], mode="free")[0])
    assert proc.last_rows.tolist() == [0, 1, 3]
    # the next step: output_ids may still be empty (overlap scheduling lags a step); no second decision
    z2 = make_logits(4, seed=1)
    got2 = proc(z2.clone(), params)
    torch.testing.assert_close(got2, torch.stack([masked(r) for r in z2]))
    assert proc.last_rows is None


def test_speculative_rows_of_one_request_decide_once():
    proc = rs.make_logit_processor(SPEC, thresholds=0.0)()
    p = req()
    z = make_logits(3)
    got = proc(z.clone(), [p, p, p])       # SGLang repeats a request's params per draft token
    torch.testing.assert_close(got[0], one_row(z[0], thresholds=0.0)[0])
    torch.testing.assert_close(got[1:], torch.stack([masked(z[1]), masked(z[2])]))


def test_one_entry_per_request_for_its_draft_rows():
    proc = rs.make_logit_processor(SPEC, thresholds=0.0)()
    z = make_logits(4)
    got = proc(z.clone(), [req(), req(7)])   # before SGLang 0.5: one entry per request, 2 draft rows each
    torch.testing.assert_close(got[0], one_row(z[0], thresholds=0.0)[0])
    torch.testing.assert_close(got[1:], torch.stack([masked(r) for r in z[1:]]))
    with pytest.raises(ValueError, match="custom_param_list has 3 entries for 4 logits rows"):
        proc(z.clone(), [req(), req(), req()])


@pytest.mark.parametrize("field", ["extend_end", "fill_ids"])   # SGLang 0.5.x, and before
def test_chunked_prefill_decides_on_the_chunk_that_ends_the_prompt(field):
    proc = rs.make_logit_processor(SPEC, thresholds=0.0)()
    r = SimpleNamespace(output_ids=[], origin_input_ids=list(range(10)))
    p = {"__req__": r}
    z = make_logits(1)
    setattr(r, field, 4 if field == "extend_end" else list(range(4)))
    torch.testing.assert_close(proc(z.clone(), [p])[0], masked(z[0]))   # a middle chunk: token discarded
    assert proc.last_rows is None
    setattr(r, field, 10 if field == "extend_end" else list(range(10)))   # the chunk that ends the prompt
    torch.testing.assert_close(proc(z.clone(), [p])[0], one_row(z[0], thresholds=0.0)[0])
    assert proc.last_rows.tolist() == [0]


def test_requests_without_custom_params_are_masked_with_a_warning(caplog):
    proc = rs.make_logit_processor(SPEC)()
    rs.RefusalLogitProcessor._warned = False
    z = make_logits(2)
    with caplog.at_level(logging.WARNING, logger="rtkern.adapters.sglang"):
        got = proc(z.clone(), [None, {"refusal_thresholds": 0.1}])   # no "__req__": position unknown
        got_none = proc(z.clone(), None)
    torch.testing.assert_close(got, torch.stack([masked(r) for r in z]))
    torch.testing.assert_close(got_none, got)
    assert "custom_params={}" in caplog.text


def test_bad_request_arguments_fall_back_to_defaults(caplog):
    proc = rs.make_logit_processor(SPEC, thresholds=0.04)()
    z = make_logits(1)
    with caplog.at_level(logging.WARNING, logger="rtkern.adapters.sglang"):
        got = proc(z.clone(), [req(refusal_thresholds={"Harmful": 0.1})])
    torch.testing.assert_close(got[0], one_row(z[0], thresholds=0.04)[0])
    assert "Harmful" in caplog.text


def test_validation_and_bad_input():
    bound = rs.make_logit_processor(SPEC)
    rs.validate_custom_params(bound, {"refusal_thresholds": [0.1, 0.2, 1.5], "refusal_mode": "sum", "other": 1})
    rs.validate_custom_params(bound, None)
    for bad, err in (({"refusal_thresholds": {"Harmful": 0.2}}, ValueError), ({"refusal_mode": "strict"}, ValueError),
                     ({"refusal_threshold": 0.2}, ValueError), ({"refusal_thresholds": "high"}, TypeError)):
        with pytest.raises(err, match="refusal|threshold"):
            rs.validate_custom_params(bound, bad)
    with pytest.raises(TypeError, match="RefusalSpec"):
        rs.make_logit_processor("not a spec")
    with pytest.raises(ValueError, match="unknown category"):
        rs.make_logit_processor(SPEC, thresholds={"Harmful": 0.2})
    with pytest.raises(ValueError, match="backend"):
        rs.make_logit_processor(SPEC, backend="cuda")
    with pytest.raises(ValueError, match="no spec"):
        rs.RefusalLogitProcessor()(make_logits(1), [req()])
    with pytest.raises(ValueError, match="2 entries for 1"):
        bound()(make_logits(1), [req(), req()])
    with pytest.raises(TypeError, match="logits"):
        bound()(torch.zeros(4, dtype=torch.int64), [req()])
    # No row at its first position: only the masking runs, and it checked no ids (IndexError).
    with pytest.raises(ValueError, match=r"control token ids \[41, 42, 43\] are out of range for a vocabulary of 41"):
        bound()(torch.zeros(2, 41), None)


def test_sglang_base_class_and_serialisation():
    base = pytest.importorskip("sglang.srt.sampling.custom_logit_processor")
    bound = rs.make_logit_processor(SPEC, thresholds={NAMES[0]: 0.04})
    assert rs.HAVE_SGLANG and issubclass(bound, base.CustomLogitProcessor)
    s = bound.to_str()
    proc = base.CustomLogitProcessor.from_str(s)          # what SGLang does per batch
    assert type(proc).spec == SPEC
    z = make_logits(2)
    got = proc(z.clone(), [req(), req(1)])
    torch.testing.assert_close(got[0], one_row(z[0], thresholds=[0.04, 0.5, 0.5])[0])
    torch.testing.assert_close(got[1], masked(z[1]))
    # and in a fresh process (the scheduler), where only rtkern and SGLang are importable
    code = ("import sys, torch; from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor as C; "
            "p = C.from_str(sys.stdin.read()); print(type(p).__name__, type(p).spec.refusal_ids)")
    out = subprocess.run([sys.executable, "-c", code], input=s, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "BoundRefusalLogitProcessor" and "(40, 41, 42)" in out.stdout


def test_processor_default_mode_and_logit_bias_reach_the_rows():
    z = make_logits(2, seed=7)
    proc = rs.make_logit_processor(SPEC, mode="free", logit_bias={NAMES[2]: 3.0})()
    got = proc(z.clone(), [req(), req(refusal_mode="category", refusal_thresholds=0.0)])
    torch.testing.assert_close(got[0], one_row(z[0], mode="free", logit_bias=[0.0, 0.0, 3.0])[0])
    torch.testing.assert_close(got[1], one_row(z[1], thresholds=0.0, logit_bias=[0.0, 0.0, 3.0])[0])
    # Only rtkern's own keys are read from custom_params.
    got = rs.make_logit_processor(SPEC, thresholds=0.0)()(z.clone(), [req(refusal_extra=1, other=2), req(3)])
    torch.testing.assert_close(got[0], one_row(z[0], thresholds=0.0)[0])
    torch.testing.assert_close(got[1], masked(z[1]))


def test_missing_custom_params_warn_once_and_default_mode_must_be_one_string(caplog):
    proc = rs.make_logit_processor(SPEC)()
    rs.RefusalLogitProcessor._warned = False
    with caplog.at_level(logging.WARNING, logger="rtkern.adapters.sglang"):
        for _ in range(3):
            proc(make_logits(2), [None, {}])
    assert sum("custom_params={}" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(TypeError, match="one string"):
        rs.make_logit_processor(SPEC, mode=["category"])
