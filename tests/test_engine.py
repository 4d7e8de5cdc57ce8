"""rtkern.engine: batched generation against a plain recompute-everything loop and transformers."""
import pytest
import torch

import rtkern
from rtkern.engine import Engine, SamplingParams
from rtkern.loader import load_model
from tiny import save_tokenizer, tiny_hf

from conftest import DEVICE, ON_GPU

PROMPTS = ["hello world", "please refuse this request kindly", "respond", "hello hello world world please"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    hf = tiny_hf(vocab=320, seed=3)
    hf.save_pretrained(d)
    save_tokenizer(d)
    model, tok = load_model(d, device=DEVICE, dtype=torch.float32)
    tok.add_control_tokens(["[refuse]", "[respond]"])
    return model, tok, hf


@pytest.fixture(scope="module")
def engine(loaded):
    model, tok, _ = loaded
    return Engine(model, tok, max_batch=4, check_every=3)


@torch.no_grad()
def reference_generate(model, tok, spec, prompt_ids, params: SamplingParams):
    """No cache, no batching: recompute the full sequence each step and sample with the reference."""
    model.remove_cache()
    seq, out, first = list(prompt_ids), [], None
    for i in range(params.max_new_tokens):
        logits = model(torch.tensor([seq], device=DEVICE))[:, -1]
        ctl = rtkern.RefusalControls.build(1, spec.num_categories, DEVICE, thresholds=params.thresholds,
                                           temperature=params.temperature, seed=params.seed,
                                           position=len(seq), first_step=i == 0, mode=params.mode)
        res = rtkern.refusal_sample(logits, spec, ctl, backend="torch")
        first = first or res
        t = int(res.tokens)
        out.append(t)
        seq.append(t)
        if t in tok.eos_ids:
            break
    return out, first


def test_spec_is_read_from_the_tokenizer(engine, loaded):
    tok = loaded[1]
    assert engine.spec.refusal_ids == (tok.token_to_id("[refuse]"),)
    assert engine.spec.respond_id == tok.token_to_id("[respond]")


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("threshold", [0.0, 2.0])
def test_batched_engine_equals_recompute_loop(engine, loaded, temperature, threshold):
    model, tok, _ = loaded
    params = [SamplingParams(temperature=temperature, thresholds=threshold, seed=s, max_new_tokens=7 + s)
              for s in range(len(PROMPTS))]
    got = engine.generate(PROMPTS, params)
    for prompt, p, r in zip(PROMPTS, params, got):
        want, first = reference_generate(model, tok, engine.spec, engine.encode(prompt), p)
        assert r.tokens == want
        assert r.refused == int(first.refused)
        assert r.refusal_probs["refuse"] == pytest.approx(first.refusal_probs[0, 0].item(), rel=1e-4)


def test_refusal_decision_and_control_tokens(engine):
    spec = engine.spec
    out = engine.generate(PROMPTS[:2], [SamplingParams(thresholds=0.0, max_new_tokens=12, temperature=1.0),
                                        SamplingParams(thresholds=1.5, max_new_tokens=12, temperature=1.0)])
    assert out[0].tokens[0] == spec.refusal_ids[0] and out[0].refused == 0 and out[0].category == "refuse"
    assert out[1].tokens[0] == spec.respond_id and out[1].refused == -1 and out[1].category is None
    for r in out:
        assert not set(r.tokens[1:]) & set(spec.control_ids)
        assert "[refuse]" not in r.text and "[respond]" not in r.text


def test_same_seed_same_tokens_whatever_the_batch(engine):
    p = SamplingParams(temperature=1.0, seed=11, max_new_tokens=10, thresholds=2.0)
    alone = engine.generate([PROMPTS[1]], p)[0].tokens
    mixed = engine.generate([PROMPTS[3], PROMPTS[1], PROMPTS[0]],
                            [SamplingParams(temperature=0.5, seed=5), p, SamplingParams(seed=2)])[1].tokens
    assert alone == mixed


def test_greedy_matches_transformers_generate(engine, loaded):
    _, tok, hf = loaded
    spec = engine.spec
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        r = engine.generate([ids], SamplingParams(max_new_tokens=10, thresholds=2.0))[0]
        assert r.tokens[0] == spec.respond_id
        # transformers continues from the same first token with control tokens suppressed
        x = torch.tensor([ids + [spec.respond_id]])
        g = hf.generate(x, max_new_tokens=9, do_sample=False, suppress_tokens=list(spec.control_ids),
                        eos_token_id=tok.eos_ids, pad_token_id=0)[0, x.shape[1]:].tolist()
        assert r.tokens[1:] == g


def test_stop_strings_eos_and_length(engine):
    base = engine.generate(["hello world"], SamplingParams(max_new_tokens=16, thresholds=2.0))[0]
    assert base.finish_reason in ("eos", "length") and len(base.tokens) <= 16
    assert len(base.text) > 2, "the tiny model should say something"
    stop = base.text[1:3]
    cut = engine.generate(["hello world"], SamplingParams(max_new_tokens=16, thresholds=2.0, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == base.text[:base.text.find(stop)]
    assert cut.tokens == base.tokens[:len(cut.tokens)] and len(cut.tokens) < len(base.tokens)
    one = engine.generate(["hello world"], SamplingParams(max_new_tokens=1))[0]
    assert len(one.tokens) == 1 and one.finish_reason in ("length", "eos")


def test_bad_requests_raise(engine):
    with pytest.raises(TypeError, match="list of prompts"):
        engine.generate("hello")
    with pytest.raises(ValueError, match="list of 2"):
        engine.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(ValueError, match="unknown category"):
        engine.generate(["a"], SamplingParams(thresholds={"violence": 0.3}))
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.generate(["a"], SamplingParams(max_new_tokens=10**6))
    with pytest.raises(ValueError, match="token-id prompts"):
        engine.generate([[5, 10**6]])
    with pytest.raises(ValueError, match="thresholds must be"):
        engine.generate(["a"], SamplingParams(thresholds=float("nan")))


@pytest.mark.parametrize("make,exc,match", [
    (lambda: SamplingParams(seed=1.7), TypeError, r"seed must be an int, got 1.7"),
    (lambda: SamplingParams(seed=2**70), ValueError, r"seed must fit in int64"),
    (lambda: SamplingParams(temperature="0.7"), TypeError, r"temperature must be a real number, got '0.7'"),
    (lambda: SamplingParams(temperature=True), TypeError, r"temperature must be a real number, got True"),
    (lambda: SamplingParams(temperature=float("nan")), ValueError, r"temperature must be finite and >= 0"),
    (lambda: SamplingParams(mode="any"), ValueError, r"mode must be one of \['category', 'sum', 'free'\], got 'any'"),
    (lambda: SamplingParams(max_new_tokens=5.0), TypeError, r"max_new_tokens must be an int, got 5.0"),
    (lambda: SamplingParams(max_new_tokens=0), ValueError, r"max_new_tokens must be >= 1, got 0"),
    (lambda: SamplingParams(stop=None), TypeError, r"stop must be a sequence of non-empty strings, got None"),
])
def test_bad_sampling_params_raise(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("prompt,params,exc,match", [
    ("a", SamplingParams(thresholds=[0.1, 0.2, 0.3]), ValueError,
     r"thresholds of one request must be a number or a list of 1 .*got shape \[3\]"),
    ("a", SamplingParams(thresholds=[[0.5]]), ValueError, r"thresholds of one request .*got shape \[1, 1\]"),
    ("a", SamplingParams(logit_bias=torch.zeros(2, 1)), ValueError, r"logit_bias of one request .*got shape \[2, 1\]"),
    ([3.7, 4.2], None, TypeError, r"token-id prompts must hold ints, got 3.7 \(float\)"),
    ([True, False], None, TypeError, r"token-id prompts must hold ints, got True \(bool\)"),
    (torch.tensor([[1, 2]]), None, TypeError, r"a tensor prompt must be a 1-D integer tensor .*shape \[1, 2\]"),
    (torch.tensor([1.0, 2.0]), None, TypeError, r"a tensor prompt must be a 1-D integer tensor"),
    (None, None, TypeError, r"a prompt must be a string, a list of token ids or a list of chat messages, got NoneType"),
    ("a", {"temperature": 0.5}, TypeError, r"params must be one SamplingParams or a list of them, got dict"),
])
def test_bad_prompts_and_per_request_values_raise(engine, prompt, params, exc, match):
    with pytest.raises(exc, match=match):
        engine.generate([prompt], params)


def test_a_bad_request_fails_before_any_batch_runs(engine, monkeypatch):
    # With max_batch=4 the first chunk would otherwise run before the fifth request's thresholds fail.
    monkeypatch.setattr(engine, "_generate_batch", lambda *a: pytest.fail("a batch ran"))
    params = [SamplingParams()] * 4 + [SamplingParams(thresholds=[0.1, 0.2])]
    with pytest.raises(ValueError, match=r"thresholds of one request"):
        engine.generate(PROMPTS + ["x"], params)


def test_tensor_prompt_equals_list_prompt(engine):
    ids = engine.encode("hello world")
    p = SamplingParams(max_new_tokens=3, thresholds=2.0)
    assert engine.generate([torch.tensor(ids)], p)[0].tokens == engine.generate([ids], p)[0].tokens


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(max_batch=0), ValueError, r"max_batch must be a positive int, got 0"),
    (dict(max_batch=-1), ValueError, r"max_batch must be a positive int, got -1"),
    (dict(max_batch=1.5), ValueError, r"max_batch must be a positive int, got 1.5"),
    (dict(check_every=0), ValueError, r"check_every must be a positive int, got 0"),
    (dict(sampler_backend="cuda"), ValueError, r"sampler_backend must be 'triton', 'torch' or None, got 'cuda'"),
    (dict(spec=[3]), TypeError, r"spec must be a RefusalSpec or None, got list"),
    (dict(spec=rtkern.RefusalSpec([10**6])), ValueError, r"control token ids \[1000000\] are out of range"),
    (dict(model=None), TypeError, r"model must be an rtkern.model.Transformer, got NoneType"),
    (dict(tokenizer=None), TypeError, r"without a tokenizer .* pass spec=RefusalSpec"),
])
def test_bad_engine_arguments_raise(loaded, kwargs, exc, match):
    model, tok, _ = loaded
    args = dict(model=model, tokenizer=tok) | kwargs
    with pytest.raises(exc, match=match):
        Engine(args.pop("model"), args.pop("tokenizer"), **args)


def test_tiny_temperature_samples_the_argmax(engine):
    # logit / T used to overflow to inf - inf = NaN and draw token 0 (EOS here) instead of the argmax.
    ids = engine.encode("hello world")
    greedy = engine.generate([ids], SamplingParams(max_new_tokens=4, thresholds=2.0))[0].tokens
    tiny = engine.generate([ids], SamplingParams(max_new_tokens=4, thresholds=2.0, temperature=1e-40))[0].tokens
    assert tiny == greedy


def test_more_prompts_than_max_batch(engine):
    prompts = PROMPTS * 2 + ["hello"]
    got = engine.generate(prompts, SamplingParams(max_new_tokens=4, thresholds=2.0))
    alone = [engine.generate([p], SamplingParams(max_new_tokens=4, thresholds=2.0))[0] for p in prompts]
    assert [r.tokens for r in got] == [r.tokens for r in alone]


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_equals_eager(loaded):
    model, tok, _ = loaded
    params = [SamplingParams(temperature=t, seed=s, max_new_tokens=20) for s, t in enumerate([0.0, 1.0, 0.7, 0.0])]
    eager = Engine(model, tok, max_batch=4, cuda_graphs=False, sampler_backend="triton").generate(PROMPTS, params)
    graph = Engine(model, tok, max_batch=4, cuda_graphs=True).generate(PROMPTS, params)
    assert [r.tokens for r in graph] == [r.tokens for r in eager]
    # the Triton decode step, replayed from its graph, against the same step run eagerly
    fused_eager = Engine(model, tok, max_batch=4, cuda_graphs=False, kernels="triton").generate(PROMPTS, params)
    fused_graph = Engine(model, tok, max_batch=4, cuda_graphs=True, kernels="triton").generate(PROMPTS, params)
    assert [r.tokens for r in fused_graph] == [r.tokens for r in fused_eager]
    greedy = [i for i, p in enumerate(params) if p.temperature == 0.0]
    assert [fused_graph[i].tokens for i in greedy] == [graph[i].tokens for i in greedy]   # fp32: same argmax


def test_prompt_text_never_becomes_a_control_token(engine):
    ids = engine.encode("please [refuse] or [respond] to this")
    assert not set(ids) & set(engine.spec.control_ids)
    r = engine.generate(["[respond] [refuse]"], SamplingParams(max_new_tokens=6, thresholds=2.0))[0]
    assert r.tokens[0] == engine.spec.respond_id and not set(r.tokens[1:]) & set(engine.spec.control_ids)


def test_thresholds_from_a_calibration_file(engine, tmp_path):
    from rtkern.thresholds import load_thresholds, save_thresholds
    save_thresholds(tmp_path / "t.json", {"refuse": 0.0})
    th = load_thresholds(tmp_path / "t.json", engine.spec)
    r = engine.generate(["hello"], SamplingParams(thresholds=th, max_new_tokens=2))[0]
    assert r.refused == 0 and r.tokens[0] == engine.spec.refusal_ids[0]


def test_thresholds_file_path_and_its_mode(engine, tmp_path):
    from rtkern.thresholds import save_thresholds
    path = save_thresholds(tmp_path / "s.json", {"refuse": 0.0}, mode="sum")
    assert SamplingParams(thresholds=path).mode == "sum" and SamplingParams().mode == "category"
    r = engine.generate(["hello"], SamplingParams(thresholds=str(path), max_new_tokens=2))[0]
    assert r.refused == 0 and r.tokens[0] == engine.spec.refusal_ids[0]
    with pytest.raises(ValueError, match="disagrees with the thresholds file's mode 'sum'"):
        SamplingParams(thresholds=path, mode="free")


@pytest.mark.parametrize("sampler_backend", ["torch", "triton"])
def test_compiled_decode_step_is_one_graph_and_matches_eager(loaded, monkeypatch, sampler_backend):
    # Dynamo's trace is the same on every device: fullgraph=True fails on any graph break, which on a GPU
    # would cost the gpt-fast-style row of the benchmark. The eager backend skips Inductor's CPU codegen.
    model, tok, _ = loaded
    graphs, compile_ = [], torch.compile

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend=count, **kw))
    torch._dynamo.reset()
    params = [SamplingParams(temperature=0.8, thresholds=0.5, seed=s, max_new_tokens=6) for s in range(3)]
    compiled = Engine(model, tok, max_batch=4, compile=True, sampler_backend=sampler_backend)
    eager = Engine(model, tok, max_batch=4, sampler_backend=sampler_backend)
    got, want = compiled.generate(PROMPTS[:3], params), eager.generate(PROMPTS[:3], params)
    assert len(graphs) == 1, f"one batch bucket compiled into {len(graphs)} graphs (a guard on Python state?)"
    assert [(r.tokens, r.refused) for r in got] == [(r.tokens, r.refused) for r in want]
    compiled.generate(PROMPTS[:1], params[:1])  # a second bucket: one more graph, not a recompile per call
    compiled.generate(PROMPTS[:3], params)
    assert len(graphs) == 2


def _special_control_checkpoint(d, scheme=None):
    """A tiny checkpoint whose tokenizer holds both schemes' control tokens as special tokens; with
    ``scheme``, an rtkern.json (as the trainer writes) says which scheme the model was trained with."""
    import json
    from rtkern.spec import control_token_strings
    strings = ["[refuse]", "[respond]"] + control_token_strings("category")[0]
    tiny_hf(vocab=320, seed=3).save_pretrained(d)
    save_tokenizer(d, control=strings)
    if scheme is not None:
        refuse = ["[refuse]"] if scheme == "single" else control_token_strings("category")[0]
        (d / "rtkern.json").write_text(json.dumps({"scheme": scheme, "refusal_tokens": refuse,
                                                   "respond_token": "[respond]"}))
    return load_model(d, device=DEVICE, dtype=torch.float32)


def test_engine_protects_control_tokens_without_rtkern_json(tmp_path):
    # exported checkpoints (GGUF, HF folders) carry the control tokens as special tokens, no rtkern.json:
    # the tokenizer alone would turn typed "[refuse]" into the control id. load_model protects them
    # (tests/test_loader.py); the engine does too, for a tokenizer made without it.
    from rtkern.tokenizer import Tokenizer
    model, _ = _special_control_checkpoint(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.token_to_id("[respond]") in tok.encode("please [respond] this")
    engine = Engine(model, tok)
    assert engine.spec.names[0] == "Humanizing requests"  # category scheme first when nothing says otherwise
    ids = engine.encode("please [respond] or [Humanizing requests] this", chat=False)
    assert tok.token_to_id("[Humanizing requests]") in engine.spec.control_ids
    assert not set(ids) & set(engine.spec.control_ids)


@pytest.mark.parametrize("scheme", ["single", "category"])
def test_engine_uses_the_trained_scheme(tmp_path, scheme):
    model, tok = _special_control_checkpoint(tmp_path, scheme)
    engine = Engine(model, tok)
    assert engine.spec.num_categories == (1 if scheme == "single" else 5)
    assert engine.spec.respond_id == tok.token_to_id("[respond]")


def test_batch_of_unequal_budgets_fits_each_request(loaded):
    # the long prompt with a short budget and the short prompt with a long one each fit the model;
    # so must the batch (it used to be checked as longest prompt + largest budget)
    model, tok, _ = loaded
    engine = Engine(model, tok, max_batch=2)
    limit = model.args.max_position_embeddings
    long = [5 + i % 200 for i in range(limit - 3)]
    params = [SamplingParams(max_new_tokens=3, thresholds=2.0, ignore_eos=True),
              SamplingParams(max_new_tokens=40, thresholds=2.0, ignore_eos=True)]
    got = engine.generate([long, [5, 6, 7]], params)
    alone = [engine.generate([p], [q])[0] for p, q in zip([long, [5, 6, 7]], params)]
    assert [len(r.tokens) for r in got] == [3, 40]
    assert [r.tokens for r in got] == [r.tokens for r in alone]


@pytest.mark.parametrize("ids_of", [list, tuple])
def test_engine_without_tokenizer_stops_at_the_models_eos(loaded, monkeypatch, ids_of):
    model, tok, _ = loaded
    spec = Engine(model, tok).spec
    ids = tok.encode("hello world")
    params = SamplingParams(max_new_tokens=12, thresholds=2.0, ignore_eos=True)
    free = Engine(model, None, spec).generate([ids], params)[0].tokens
    stop_at = next(i for i, t in enumerate(free) if i > 1 and t not in spec.control_ids)
    monkeypatch.setattr(model.args, "eos_token_id", ids_of([free[stop_at]]))  # a token this model will produce
    r = Engine(model, None, spec).generate([ids], SamplingParams(max_new_tokens=12, thresholds=2.0))[0]
    first = free.index(free[stop_at])
    assert r.finish_reason == "eos" and r.tokens == free[:first + 1]
    # stop strings are matched on the text, which an engine without a tokenizer cannot read
    with pytest.raises(ValueError, match=r"stop strings \['\.'\] need a tokenizer .* this engine has none"):
        Engine(model, None, spec).generate([ids], SamplingParams(max_new_tokens=4, stop=["."]))


# -- per-request controls, finish reasons and batching (each test kills a surviving engine mutation) --

def _same(got, want):
    """Results equal up to float noise in the probabilities (batched matmuls round differently)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.tokens, g.text, g.refused, g.category, g.finish_reason) == \
            (w.tokens, w.text, w.refused, w.category, w.finish_reason)
        assert g.refusal_probs == pytest.approx(w.refusal_probs, rel=1e-4, abs=1e-7)


def _first_logits(model, ids):
    """The model's logits for the first generated position, computed without the engine."""
    model.remove_cache()
    with torch.no_grad():
        return model(torch.tensor([ids], device=DEVICE))[:, -1]


def test_logit_bias_is_per_request(engine, loaded):
    model = loaded[0]
    spec, prompts = engine.spec, PROMPTS[:3]
    # p(refuse) is ~0.005 unbiased: +8 lifts it past 0.5, -8 keeps it far below
    params = [SamplingParams(logit_bias=b, thresholds=0.5, max_new_tokens=3) for b in (-8.0, 8.0, 0.0)]
    got = engine.generate(prompts, params)
    assert [r.refused for r in got] == [-1, 0, -1]
    for prompt, p, r in zip(prompts, params, got):
        _same([r], engine.generate([prompt], p))
        ids = engine.encode(prompt)
        logits, bias = _first_logits(model, ids), torch.full((1, 1), p.logit_bias, device=DEVICE)
        want = rtkern.refusal_probs(logits, spec, logit_bias=bias)
        assert r.refusal_probs["refuse"] == pytest.approx(want[0, 0].item(), rel=1e-4)
        ctl = rtkern.RefusalControls.build(1, 1, DEVICE, thresholds=0.5, logit_bias=p.logit_bias,
                                           temperature=0.0, position=len(ids))
        assert r.refused == int(rtkern.refusal_sample(logits, spec, ctl).refused)


@pytest.fixture(scope="module")
def category_engine(tmp_path_factory):
    model, tok = _special_control_checkpoint(tmp_path_factory.mktemp("category"))
    return Engine(model, tok, max_batch=4, check_every=3)


def test_one_batch_mixes_modes(category_engine):
    engine, spec = category_engine, category_engine.spec
    assert spec.num_categories == 5
    # with +3 on every refusal token each p_c is ~0.03-0.06 and their sum ~0.23: sum refuses at 0.2,
    # category does not, free (greedy) emits the model's own argmax instead of [respond]
    params = [SamplingParams(mode=m, thresholds=0.2, logit_bias=3.0, max_new_tokens=4) for m in
              ("category", "sum", "free", "sum")]
    got = engine.generate(PROMPTS, params)
    alone = [engine.generate([q], p)[0] for q, p in zip(PROMPTS, params)]
    _same(got, alone)
    assert got[0].refused == -1 and got[0].tokens[0] == spec.respond_id
    assert got[1].refused >= 0 and got[1].tokens[0] == spec.refusal_ids[got[1].refused]
    assert got[2].tokens[0] != spec.respond_id


def test_ignore_eos_runs_to_max_new_tokens(engine, loaded, monkeypatch):
    tok = loaded[1]
    ids = engine.encode("hello world")
    free = engine.generate([ids], SamplingParams(max_new_tokens=8, thresholds=2.0, ignore_eos=True))[0]
    produced = free.tokens[2]  # a token the model generates (after the control token)
    monkeypatch.setattr(tok, "eos_ids", tok.eos_ids + [produced])
    stops = engine.generate([ids], SamplingParams(max_new_tokens=8, thresholds=2.0))[0]
    assert stops.finish_reason == "eos" and stops.tokens == free.tokens[:free.tokens.index(produced) + 1]
    runs = engine.generate([ids], SamplingParams(max_new_tokens=8, thresholds=2.0, ignore_eos=True))[0]
    assert runs.finish_reason == "length" and runs.tokens == free.tokens and len(runs.tokens) == 8


def test_invalid_rows_are_reported_and_leave_the_others_alone(loaded, monkeypatch):
    model, tok, _ = loaded
    engine = Engine(model, tok, max_batch=4, check_every=3, cuda_graphs=False)
    params = [SamplingParams(temperature=1.0, seed=s, thresholds=2.0, max_new_tokens=6, ignore_eos=True)
              for s in range(4)]
    alone = [engine.generate([q], p)[0] for q, p in zip(PROMPTS, params)]
    poison = {0: 1, 3: 2}  # forward call -> row whose logits turn NaN: row 1 at prefill, row 2 at decode step 3
    calls, forward = [], model.forward

    def nan_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        if len(calls) in poison:
            out[poison[len(calls)]] = float("nan")
        calls.append(1)
        return out

    monkeypatch.setattr(model, "forward", nan_forward)
    got = engine.generate(PROMPTS, params)
    monkeypatch.undo()
    assert got[1].finish_reason == "invalid" and got[1].refused == -2 and got[1].tokens == []
    assert got[1].category is None and got[1].text == ""
    assert got[2].finish_reason == "invalid" and got[2].tokens == alone[2].tokens[:3]
    assert got[2].refused == alone[2].refused == -1
    _same([got[0], got[3]], [alone[0], alone[3]])
    for r in got:
        assert all(0 <= t < model.args.vocab_size for t in r.tokens)


def test_stop_cuts_at_the_shortest_token_prefix(loaded):
    model, tok, _ = loaded
    engine = Engine(model, tok, max_batch=4, check_every=64)  # no early exit: every token is generated
    p = dict(temperature=1.0, seed=7, thresholds=2.0, max_new_tokens=16, ignore_eos=True)
    base = engine.generate(["hello world"], SamplingParams(**p))[0]
    skip = set(engine.spec.control_ids) | set(tok.eos_ids)

    def text(row):
        return tok.decode([t for t in row if t not in skip], skip_special_tokens=True)

    assert text(base.tokens) == base.text and len(base.text) > 8
    stop = base.text[len(base.text) // 2:][:2]
    cut = engine.generate(["hello world"], SamplingParams(**p, stop=[stop]))[0]
    k = next(k for k in range(1, len(base.tokens) + 1) if stop in text(base.tokens[:k]))
    assert k < len(base.tokens), "the stop string must end before the last token"
    assert cut.finish_reason == "stop" and cut.tokens == base.tokens[:k]
    assert cut.text == base.text[:base.text.find(stop)]


def test_max_batch_caps_the_batch(loaded):
    model, tok, _ = loaded
    engine = Engine(model, tok, max_batch=3, check_every=3)
    prompts = PROMPTS + ["hello"]
    params = [SamplingParams(temperature=1.0, seed=s, thresholds=2.0, max_new_tokens=5) for s in range(5)]
    alone = [engine.generate([q], p)[0] for q, p in zip(prompts, params)]
    _same(engine.generate(prompts[:3], params[:3]), alone[:3])
    _same(engine.generate(prompts, params), alone)   # chunks of 3 and 2


# -- edges of the engine (each test kills a surviving engine.py mutation) --

def test_text_leaves_out_an_eos_that_is_an_ordinary_token(engine, loaded, monkeypatch):
    # an eos id that the tokenizer does not treat as special (a config's extra eos) still stays out of the text
    tok = loaded[1]
    ids = engine.encode("hello world")
    free = engine.generate([ids], SamplingParams(max_new_tokens=8, thresholds=2.0, ignore_eos=True))[0]
    produced = next(t for t in free.tokens[2:] if tok.decode([t], skip_special_tokens=True))
    monkeypatch.setattr(tok, "eos_ids", tok.eos_ids + [produced])
    r = engine.generate([ids], SamplingParams(max_new_tokens=8, thresholds=2.0))[0]
    assert r.finish_reason == "eos" and r.tokens[-1] == produced
    assert r.text == tok.decode(r.tokens[1:-1], skip_special_tokens=True)
    assert r.text != tok.decode(r.tokens[1:], skip_special_tokens=True)


def test_the_earliest_of_several_stop_strings_cuts_even_after_eos(loaded, monkeypatch):
    model, tok, _ = loaded
    engine = Engine(model, tok, max_batch=4, check_every=64)
    p = dict(temperature=1.0, seed=7, thresholds=2.0, max_new_tokens=16)
    base = engine.generate(["hello world"], SamplingParams(**p, ignore_eos=True))[0]
    early, late = base.text[1:3], base.text[len(base.text) // 2:][:2]
    assert base.text.find(early) < base.text.find(late)
    # the stop strings listed latest-first; the text also ends on an eos after the late one
    monkeypatch.setattr(tok, "eos_ids", tok.eos_ids + [base.tokens[-1]])
    first_eos = base.tokens.index(base.tokens[-1])
    assert tok.decode(base.tokens[:first_eos]).find(late) >= 0, "the eos must come after both stop strings"
    cut = engine.generate(["hello world"], SamplingParams(**p, stop=[late, early]))[0]
    assert cut.finish_reason == "stop" and cut.text == base.text[:base.text.find(early)]
    assert len(cut.tokens) < first_eos + 1 and cut.tokens == base.tokens[:len(cut.tokens)]


def test_prompt_plus_budget_may_not_pass_the_context(loaded):
    model, tok, _ = loaded
    engine = Engine(model, tok, max_batch=1)
    limit = model.args.max_position_embeddings
    ids = [5 + i % 200 for i in range(limit - 4)]
    with pytest.raises(ValueError, match=f"prompt \\+ max_new_tokens = {limit + 1} exceeds"):
        engine.generate([ids], SamplingParams(max_new_tokens=5, thresholds=2.0))
    r = engine.generate([ids], SamplingParams(max_new_tokens=4, thresholds=2.0, ignore_eos=True))[0]
    assert len(r.tokens) == 4


def test_chat_flag_picks_the_encoding(engine, loaded):
    tok = loaded[1]
    plain, chat = engine.encode("hello world", chat=False), engine.encode("hello world")
    assert plain == tok.encode("hello world")
    assert chat == tok.apply_chat_template([{"role": "user", "content": "hello world"}]) and chat != plain
    p = SamplingParams(max_new_tokens=3, thresholds=2.0)
    assert engine.generate(["hello world"], p, chat=False)[0].tokens == engine.generate([plain], p)[0].tokens
    with pytest.raises(ValueError, match=r"prompts \[1\] encode to no tokens"):
        engine.generate(["hello", ""], p, chat=False)


def test_engine_replaces_a_cache_it_did_not_make(loaded):
    # a cache set up by someone else (big enough, but for one row) is not the engine's to reuse
    model, tok, _ = loaded
    engine = Engine(model, tok, max_batch=4, check_every=3)
    p = SamplingParams(max_new_tokens=4, thresholds=2.0)
    want = engine.generate(PROMPTS, p)
    model.setup_cache(1, 512)
    _same(engine.generate(PROMPTS, p), want)


@pytest.mark.parametrize("prompt,match", [
    ([320], r"token-id prompts must be non-empty ids in \[0, 320\)"),
    ([5, -1], r"token-id prompts must be non-empty ids in \[0, 320\)"),
])
def test_token_ids_outside_the_vocab_raise(engine, prompt, match):
    with pytest.raises(ValueError, match=match):
        engine.generate([prompt])


def test_more_sampling_params_checks():
    assert SamplingParams(stop="ab").stop == ("ab",)   # one string is one stop string, not its characters
    with pytest.raises(TypeError, match=r"ignore_eos must be a bool, got 1"):
        SamplingParams(ignore_eos=1)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(compile="yes"), TypeError, r"compile must be a bool, got 'yes'"),
    (dict(cuda_graphs=1), TypeError, r"cuda_graphs must be a bool, got 1"),
] + ([] if ON_GPU else [(dict(cuda_graphs=True), ValueError, r"cuda_graphs needs the model on CUDA, got cpu")]))
def test_more_bad_engine_arguments_raise(loaded, kwargs, exc, match):
    model, tok, _ = loaded
    with pytest.raises(exc, match=match):
        Engine(model, tok, **kwargs)


def test_text_leaves_out_control_tokens_that_are_ordinary_words(loaded):
    # control tokens may be plain vocabulary entries (decode's skip_special_tokens does not drop those)
    model, tok, _ = loaded
    words = list(dict.fromkeys(tok.encode("hello world please")))
    spec = rtkern.RefusalSpec((words[0],), respond_id=words[1])
    r = Engine(model, tok, spec).generate(["hello"], SamplingParams(max_new_tokens=5, thresholds=2.0))[0]
    assert r.tokens[0] == spec.respond_id and tok.decode([spec.respond_id], skip_special_tokens=True)
    assert r.text == tok.decode(r.tokens[1:], skip_special_tokens=True)
