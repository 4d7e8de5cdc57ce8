"""rtkern.adapters.vllm's Model Runner V2 processor against vLLM's own loader, validator and context.

Skipped where vLLM cannot be imported (CI installs no vLLM; its wheel targets CUDA). The V2
logits-processor modules of vLLM 0.33 and 0.34 import on a CPU machine, so these tests ran there: the processor is loaded
by its ``--logits-processors`` string through vLLM's loader, built by ``build_custom_logits_processors``
from request state of the runner's shape, validates real ``SamplingParams`` at admission, and reads a
real ``LogitsContext``.
"""
from types import SimpleNamespace

import pytest
import torch

lp = pytest.importorskip("vllm.v1.worker.gpu.sample.logits_processor")
loader = pytest.importorskip("vllm.v1.worker.gpu.sample.logits_processor.loader")
from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

from rtkern.adapters import vllm as rv  # noqa: E402
from test_adapters_vllm import NAMES, RESPOND, SPEC, make_logits, masked, one_row  # noqa: E402

FQCN = "rtkern.adapters.vllm:RefusalLogitsProcessorV2"


def test_vllm_loads_the_v2_processor_by_its_documented_name():
    assert rv.HAVE_VLLM_V2
    [cls] = loader._load_v2_logitsprocs_by_fqcns([FQCN])
    assert cls is rv.RefusalLogitsProcessorV2 and issubclass(cls, lp.LogitsProcessor)
    bound = rv.make_logits_processor(SPEC, runner="v2")
    assert loader._load_v2_logitsprocs_by_fqcns([bound]) == [bound]    # the offline LLM(...) class form
    if not rv.HAVE_VLLM:   # vLLM >= 0.34 has no v1 interface: the factory's default is v2 there
        assert issubclass(rv.make_logits_processor(SPEC), rv.RefusalLogitsProcessorV2)


def test_admission_validation_with_real_sampling_params():
    validate = loader.build_custom_logits_processors_params_validator([FQCN])
    validate(SamplingParams(extra_args={"refusal_thresholds": {"Unsupported requests": 0.2}, "refusal_mode": "sum"}))
    validate(SamplingParams())
    for bad in ({"refusal_thresholds": {"Harmful": 0.2}}, {"refusal_mode": "strict"}, {"refusal_threshold": 0.3}):
        with pytest.raises(VLLMValidationError, match="refusal"):   # the request fails, the engine runs on
            validate(SamplingParams(extra_args=bad))


def test_built_by_vllm_and_applied_through_a_real_logits_context():
    t = torch.tensor([5, 9, 3, 7], dtype=torch.int32)
    req_states = SimpleNamespace(device=torch.device("cpu"), max_num_reqs=4, vocab_size=64, all_token_ids=None,
                                 prompt_len=SimpleNamespace(gpu=t, np=t.numpy()), prefill_len=None, total_len=None)
    bound = rv.make_logits_processor(SPEC, runner="v2", backend="torch")
    [proc] = loader.build_custom_logits_processors(None, req_states, False, [bound])
    extras = [{}, {"refusal_thresholds": 0.0}, {"refusal_thresholds": 2.0}, {"refusal_thresholds": {NAMES[1]: 0.01}}]
    for slot, extra in enumerate(extras):
        assert proc.add_request(slot, SamplingParams(extra_args=extra or None)) is True
    proc.apply_staged_writes()
    slots, pos = [2, 0, 1, 3], [2, 4, 5, 6]   # slots 2, 0 and 3 at their first output; slot 1 mid-prefill
    idx = torch.tensor(slots, dtype=torch.int32)
    ctx = lp.LogitsContext(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=idx.numpy(),
                           expanded_local_pos=torch.zeros(4, dtype=torch.int32),
                           input_ids=torch.zeros(4, dtype=torch.int64), pos=torch.tensor(pos),
                           seq_lens_upper_bound_np=torch.tensor(pos).numpy() + 1)
    z = make_logits(4, seed=8)
    got = proc.apply(z.clone(), ctx)
    want = [one_row(z[0], thresholds=2.0)[0], one_row(z[1])[0], masked(z[2]),
            one_row(z[3], thresholds=[0.5, 0.01, 0.5])[0]]
    torch.testing.assert_close(got, torch.stack(want))
    assert got[0].argmax() == RESPOND
