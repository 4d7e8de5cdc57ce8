"""rtkern.adapters.vllm against vLLM's own classes: its loader, SamplingParams, BatchUpdateBuilder.

Skipped where vLLM cannot be imported (CI installs no vLLM; its wheel targets CUDA). vLLM 0.33's
logits-processor modules import on a CPU machine, so these tests ran there: the processor is loaded
by its ``--logits-processors`` string through vLLM's loader, validates real ``SamplingParams`` at
vLLM's entrypoint hook, and follows batch changes built by the runner's ``BatchUpdateBuilder``.
"""
import pytest
import torch

lp = pytest.importorskip("vllm.v1.sample.logits_processor")
state = pytest.importorskip("vllm.v1.sample.logits_processor.state")
from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

from rtkern.adapters import vllm as rv  # noqa: E402
from test_adapters_vllm import NAMES, REFUSE, SPEC, make_logits, masked, one_row  # noqa: E402

FQCN = "rtkern.adapters.vllm:RefusalLogitsProcessor"


def test_vllm_loads_the_processor_by_its_documented_name():
    assert rv.HAVE_VLLM
    [cls] = lp._load_logitsprocs_by_fqcns([FQCN])
    assert cls is rv.RefusalLogitsProcessor and issubclass(cls, lp.LogitsProcessor)
    bound = rv.make_logits_processor(SPEC)
    assert lp._load_logitsprocs_by_fqcns([bound]) == [bound]       # the offline LLM(...) class form
    proc = bound(None, torch.device("cpu"), False)
    procs = state.LogitsProcessors([proc])
    assert list(procs.non_argmax_invariant) == [proc] and not procs.argmax_invariant


def test_vllm_entrypoint_validation_with_real_sampling_params():
    ok = SamplingParams(extra_args={"refusal_thresholds": {"Unsupported requests": 0.2}, "refusal_mode": "sum"})
    lp.validate_logits_processors_parameters([FQCN], ok)
    lp.validate_logits_processors_parameters([FQCN], SamplingParams())
    for bad in ({"refusal_thresholds": {"Harmful": 0.2}}, {"refusal_mode": "strict"},
                {"refusal_threshold": 0.3}):
        with pytest.raises(VLLMValidationError, match="refusal"):  # the HTTP 400 of the server
            lp.validate_logits_processors_parameters([FQCN], SamplingParams(extra_args=bad))


def test_batch_changes_from_vllms_builder():
    proc = rv.make_logits_processor(SPEC, thresholds=0.04)(None, torch.device("cpu"), False)
    builder = state.BatchUpdateBuilder()
    outs = [[], [], []]
    builder.added.append((0, SamplingParams(), [1, 2], outs[0]))
    builder.added.append((1, SamplingParams(extra_args={"refusal_thresholds": {NAMES[1]: 0.0}}), [3], outs[1]))
    builder.added.append((2, SamplingParams(extra_args={"refusal_mode": "free"}), [4], outs[2]))
    proc.update_state(builder.get_and_reset(3))
    z = make_logits(3)
    got = proc.apply(z.clone())
    torch.testing.assert_close(got[0], one_row(z[0], thresholds=0.04)[0])
    row1, res1 = one_row(z[1], thresholds=[0.04, 0.0, 0.04])
    torch.testing.assert_close(got[1], row1)
    assert int(res1.refused) >= 0 and got[1].argmax() == REFUSE[int(res1.refused)]
    torch.testing.assert_close(got[2], one_row(z[2], mode="free")[0])

    # step 2 (vLLM applies removed, then added, then moved): request 0 finishes and a new request fills
    # its row at its first position; rows 1 and 2 swap
    for o in outs:
        o.append(9)
    builder.removed_append(0)
    builder.added.append((0, SamplingParams(extra_args={"refusal_thresholds": 0.0}), [5], []))
    builder.moved.append((1, 2, lp.MoveDirectionality.SWAP))
    proc.update_state(builder.get_and_reset(3))
    z2 = make_logits(3, seed=1)
    got = proc.apply(z2.clone())
    row0, res0 = one_row(z2[0], thresholds=0.0)
    torch.testing.assert_close(got[0], row0)
    torch.testing.assert_close(got[1:], torch.stack([masked(z2[1]), masked(z2[2])]))
    assert proc.state.last_rows.tolist() == [0] and int(res0.refused) >= 0
    assert proc.state.requests[1].mode == 2                  # request 2 ("free") now sits in row 1
    assert builder.get_and_reset(3) is None                  # no change: update_state(None)
    proc.update_state(None)
