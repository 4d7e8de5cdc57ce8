"""What the engine captures in a CUDA graph must not round-trip through the host.

Capture fails ("operation not permitted when stream is capturing") on any op that waits for the GPU
(``.item()``, boolean indexing, ``nonzero``) or copies Python data in (``torch.tensor([...])``). No
GPU here, so the ops each step dispatches are recorded on the CPU and checked against that list.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rtkern
from rtkern.engine import Engine, SamplingParams
from rtkern.loader import load_model
from rtkern.reference import sample_reference
from tiny import save_tokenizer, tiny_hf

from conftest import DEVICE

_SYNCING = {"aten.lift_fresh", "aten.nonzero", "aten.masked_select", "aten._local_scalar_dense",
            "aten.is_nonzero", "aten.equal", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive"}
_INDEXING = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}


class HostSyncError(AssertionError):
    pass


class NoHostSync(TorchDispatchMode):
    """Raises on ops that could not be captured in a CUDA graph."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in _SYNCING:
            raise HostSyncError(f"{func} waits for the device or copies host data in")
        if name in _INDEXING:
            index = args[1] if len(args) > 1 else kwargs.get("indices")
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in index or ()):
                raise HostSyncError(f"{func} with a boolean index needs its nonzero count on the host")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bad", [
    lambda x: torch.tensor([1, 2], device=x.device),
    lambda x: x[x > 0],
    lambda x: x.sum().item(),
    lambda x: x.masked_fill(x > 0, 0).nonzero(),
    lambda x: x.clone().__setitem__(x > 0, 1.0),
])
def test_the_guard_catches_host_round_trips(bad):
    x = torch.randn(4, 6, device=DEVICE)
    with pytest.raises(HostSyncError), NoHostSync():
        bad(x)


def _controls(B, C, V, rng, mask):
    ctl = rtkern.RefusalControls.build(B, C, DEVICE, thresholds=0.3, temperature=[0.0, 0.7, 1.3][:B],
                                       seed=[1, 2, 3][:B], mode=["category", "sum", "free"][:B], first_step=True)
    if mask:
        allowed = torch.rand(B, V, generator=rng) < 0.5
        ctl.vocab_mask = rtkern.pack_vocab_mask(allowed.to(DEVICE))
    return ctl


@pytest.fixture(autouse=True)
def _as_on_a_gpu(monkeypatch):
    # RefusalControls.check reads the mode codes' values on CPU tensors only (free there; a GPU would wait).
    monkeypatch.setattr("rtkern.spec._check_modes", lambda mode: None)


@pytest.mark.parametrize("V", [111, 4099])
@pytest.mark.parametrize("mask", [False, True])
def test_torch_sampler_makes_no_host_round_trip(V, mask):
    rng = torch.Generator().manual_seed(V)
    spec = rtkern.RefusalSpec([V - 3, 5], V - 1, ["a", "b"])
    logits = torch.randn(3, V, generator=rng).to(DEVICE)
    controls = _controls(3, 2, V, rng, mask)
    out = rtkern.SampleOutput.empty(3, 2, DEVICE)
    want = sample_reference(logits, spec, controls)  # also builds the cached id tensor, as the warm-up does
    with NoHostSync():
        got = rtkern.refusal_sample(logits, spec, controls, out=out, backend="torch")
        rtkern.refusal_probs(logits, spec, backend="torch")
        rtkern.apply_refusal_(logits.clone(), spec, controls, backend="torch")
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.refused, want.refused)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    d = tmp_path_factory.mktemp("graph_safe")
    tiny_hf(vocab=320, seed=3).save_pretrained(d)
    save_tokenizer(d, control=["[refuse]", "[respond]"])
    return load_model(d, device=DEVICE, dtype=torch.float32)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_engine_decode_step_makes_no_host_round_trip(loaded, backend, kernels):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=2, sampler_backend=backend, kernels=kernels, cuda_graphs=False)
    engine.generate(["hello world", "please"], SamplingParams(temperature=0.8, thresholds=0.5, max_new_tokens=3))
    slot = engine._slot(2)   # what the generate call stepped: the graph would hold exactly this call
    with torch.inference_mode(), NoHostSync():
        engine._step_fn(slot.tokens, slot.pos, slot.controls, slot.out)
