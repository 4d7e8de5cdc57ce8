"""Scorer: static-shape padding (the CUDA-graph path's shapes, checked on any device) and CUDA graphs (GPU)."""
import pytest
import torch

from conftest import ON_GPU
from rtkern.scoring import Scorer, _render_all, score
from rtkern.spec import RefusalSpec

PROMPTS = ["hello", "please refuse this request kindly and at length " * 3, "respond", "world " * 9,
           [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}], "x", "refuse", "ok ok"]


def _load(tiny_category, device="cpu", dtype=None):
    from rtkern.loader import load_model
    model, tok = load_model(tiny_category, device=device, dtype=dtype)
    return model, tok, RefusalSpec.from_tokenizer(tok, "category", require_respond=True)


@pytest.mark.parametrize("batch_size,bucket", [(1, 7), (3, 16), (16, 1), (5, 64)])
def test_padded_chunks_score_like_unpadded(tiny_category, batch_size, bucket):
    model, tok, spec = _load(tiny_category)
    want = score(model, tok, PROMPTS, spec, batch_size=batch_size, progress=False)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    try:
        got = Scorer(model, tok, spec, batch_size=batch_size, bucket=bucket)(PROMPTS, progress=False)
    finally:
        hook.remove()
    # every chunk is batch_size rows of a bucket multiple: the shapes a CUDA graph is captured with
    assert seen and all(b == batch_size and t % bucket == 0 for b, t in seen)
    real = sum(map(len, _render_all(tok, PROMPTS)))
    assert sum(b * t for b, t in seen) > real  # padding happened, and it changed nothing below
    torch.testing.assert_close(got, want, atol=1e-12, rtol=3e-5)
    assert want[:, :5].std() > 1e-3  # scores differ between prompts: a row mix-up would show


def test_scorer_protects_the_control_tokens_of_its_spec(tmp_path):
    # A tokenizer that still turns the text "[refuse]" into the special token (nothing protected it):
    # the scorer must score that prompt as text, not read the probabilities after a real control token.
    import tiny
    from rtkern.loader import load_model
    from rtkern.tokenizer import Tokenizer
    tiny.save_scoring_model(tmp_path, ["[refuse]", "[respond]"])
    model, protected = load_model(tmp_path, device="cpu")
    raw = Tokenizer.from_dir(tmp_path)
    spec = RefusalSpec.find(raw)
    assert not set(raw.encode("[refuse]")).isdisjoint(spec.control_ids)
    got = score(model, raw, ["[refuse]", "hello"], spec, progress=False)
    assert set(raw.encode("[refuse]")).isdisjoint(spec.control_ids)
    torch.testing.assert_close(got, score(model, protected, ["[refuse]", "hello"], spec, progress=False))


def test_scorer_is_reusable_and_keeps_prompt_order(tiny_category):
    model, tok, spec = _load(tiny_category)
    scorer = Scorer(model, tok, spec, batch_size=3, bucket=8)
    a = scorer(PROMPTS, progress=False)
    b = scorer(PROMPTS[::-1], progress=False)
    torch.testing.assert_close(b, a.flip(0), atol=1e-12, rtol=3e-5)
    assert scorer([], progress=False).shape == (0, 6)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(cuda_graphs=1), TypeError, r"cuda_graphs must be a bool, got 1"),
    (dict(bucket=0), ValueError, r"bucket must be a positive int, got 0"),
    (dict(batch_size=2.0), ValueError, r"batch_size must be a positive int, got 2.0"),
    (dict(spec="category"), TypeError, r"spec must be a RefusalSpec, got str"),
] + ([] if ON_GPU else [(dict(cuda_graphs=True), ValueError, r"cuda_graphs needs the model on CUDA, got cpu")]))
def test_scorer_rejects_bad_arguments(tiny_category, kwargs, exc, match):
    model, tok, spec = _load(tiny_category)
    kwargs = {"spec": spec, **kwargs}
    with pytest.raises(exc, match=match):
        Scorer(model, tok, **kwargs)


def test_scorer_rejects_a_model_with_a_cache_and_single_strings(tiny_category):
    model, tok, spec = _load(tiny_category)
    scorer = Scorer(model, tok, spec)
    with pytest.raises(TypeError, match="single string"):
        scorer("hello")
    model.setup_cache(2, 64)
    try:
        with pytest.raises(ValueError, match="remove_cache"):
            scorer(PROMPTS[:1], progress=False)
    finally:
        model.remove_cache()


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_equal_eager_and_recapture_for_new_weights(tiny_category, dtype):
    model, tok, spec = _load(tiny_category, "cuda", dtype)
    scorer = Scorer(model, tok, spec, batch_size=3, cuda_graphs=True, bucket=16)
    eager = Scorer(model, tok, spec, batch_size=3, bucket=16)
    tol = dict(atol=1e-6, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-3, rtol=2e-2)
    torch.testing.assert_close(scorer(PROMPTS, progress=False), eager(PROMPTS, progress=False), **tol)
    captured = dict(scorer._graphs)
    assert captured  # the path under test really captured graphs
    torch.testing.assert_close(scorer(PROMPTS, progress=False), eager(PROMPTS, progress=False), **tol)
    assert scorer._graphs == captured  # replayed, not captured again
    with torch.no_grad():  # new tensors, not an in-place edit: the old graphs would read the old weights
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight * 0.5)
    after = scorer(PROMPTS, progress=False)
    assert scorer._graphs.keys() == captured.keys() and all(scorer._graphs[k] is not captured[k] for k in captured)
    torch.testing.assert_close(after, eager(PROMPTS, progress=False), **tol)
