"""rtkern.adapters.hf: RefusalLogitsProcessor inside a real transformers ``generate`` on a tiny Llama.

The expected decisions come from rtkern's own sampler (torch reference) on the same first-position
logits, and the whole greedy text from rtkern's own model loaded from the same checkpoint.
"""
import importlib.util

import pytest
import torch

from rtkern import RefusalControls, RefusalSpec, refusal_probs, refusal_sample
from rtkern.adapters.hf import PENDING, RefusalLogitsProcessor
from test_sampler import chi2_critical

transformers = pytest.importorskip("transformers")

V = 320
REFUSE = (300, 301, 302)
RESPOND = 303
CONTROL = REFUSE + (RESPOND,)
NAMES = ("Humanizing requests", "Incomplete requests", "Requests with safety concerns")
SPEC = RefusalSpec(list(REFUSE), RESPOND, names=NAMES)
L = 8  # prompt length of the equal-length batches


def _tiny_llama(seed=0, control_gain=6.0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, vocab_size=V,
                                   tie_word_embeddings=False, eos_token_id=1, bos_token_id=2, pad_token_id=0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        # Spread the control tokens' probabilities (random heads give ~1/V each) so thresholds between
        # 0 and 1 split the prompts, and so unmasked sampling would often draw them.
        m.lm_head.weight[list(CONTROL)] *= control_gain
    # No EOS stop: every row generates exactly max_new_tokens, so texts compare position by position.
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls: a second OpenMP thread only adds barrier stalls when the CPU is shared.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def hf():
    return _tiny_llama()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 290, (8, L), generator=g)


def first_logits(model, ids, attention_mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=attention_mask).logits[:, -1].float()


def split_thresholds(probs, margin=0.05):
    """Per-category thresholds that leave some rows above and some below, far from every probability."""
    thr = []
    for c in range(probs.shape[1]):
        p = probs[:, c].sort().values
        gaps = (p[1:] / p[:-1]).log()
        gaps[: len(gaps) - 2] = -1  # cut below the top one or two rows: a few refusals per category
        k = int(gaps.argmax())
        assert gaps[k] > margin, "no clean cut between the probabilities"
        thr.append(float((p[k] * p[k + 1]).sqrt()))
    return torch.tensor(thr)


def expected(logits, thresholds, mode="category", logit_bias=0.0, spec=SPEC):
    c = RefusalControls.build(logits.shape[0], spec.num_categories, "cpu", thresholds=thresholds, mode=mode,
                              logit_bias=logit_bias, temperature=0.0, first_step=True)
    return refusal_sample(logits, spec, c, backend="torch")


def generate(model, ids, proc, **kw):
    kw.setdefault("max_new_tokens", 6)
    kw.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), logits_processor=[proc], **kw)


def no_controls(tokens):
    return not torch.isin(tokens, torch.tensor(CONTROL)).any()


# -- greedy: decisions, probabilities, later positions --------------------------------------------------
def test_greedy_first_token_is_rtkerns_decision(hf, prompts):
    logits = first_logits(hf, prompts)
    thr = split_thresholds(refusal_probs(logits, SPEC))
    want = expected(logits, thr)
    assert (want.refused >= 0).any() and (want.refused == -1).any(), "test needs both outcomes"
    proc = RefusalLogitsProcessor(SPEC, thresholds=thr)
    out = generate(hf, prompts, proc)
    first = out[:, L]
    torch.testing.assert_close(first, want.tokens)
    assert set(first.tolist()) <= set(CONTROL)
    assert ((first == RESPOND) == (want.refused == -1)).all()
    assert no_controls(out[:, L + 1:])
    torch.testing.assert_close(proc.refusal_probs, refusal_probs(logits, SPEC), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(proc.refused, want.refused)
    torch.testing.assert_close(proc.forced_tokens, want.tokens)
    assert proc.prompt_length == L


def test_category_names_and_switching_a_category_off(hf, prompts):
    logits = first_logits(hf, prompts)
    probs = refusal_probs(logits, SPEC)
    thr = split_thresholds(probs)
    base = expected(logits, thr)
    off = int(torch.mode(base.refused[base.refused >= 0]).values)  # a category some rows refuse with
    thr_off = thr.clone()
    thr_off[off] = 1.5
    proc = RefusalLogitsProcessor(SPEC, thresholds={**{n: float(t) for n, t in zip(NAMES, thr)}, NAMES[off]: 1.5})
    out = generate(hf, prompts, proc, max_new_tokens=3)
    want = expected(logits, thr_off)
    torch.testing.assert_close(out[:, L], want.tokens)
    assert not (out[:, L] == REFUSE[off]).any() and not (proc.refused == off).any()
    # Rows that refused with another category are unaffected.
    keep = (base.refused >= 0) & (base.refused != off)
    torch.testing.assert_close(out[keep, L], base.tokens[keep])


def test_per_prompt_thresholds_and_logit_bias(hf, prompts):
    logits = first_logits(hf, prompts)
    B = prompts.shape[0]
    thr = torch.full((B, 3), 2.0)
    thr[::2] = 0.0  # even rows always refuse (largest category), odd rows never
    bias = torch.tensor([0.0, 1.5, -1.0])
    proc = RefusalLogitsProcessor(SPEC, thresholds=thr, logit_bias=bias)
    out = generate(hf, prompts, proc, max_new_tokens=3)
    bias_rows = bias.expand(B, 3).contiguous()
    want = expected(logits, thr, logit_bias=bias_rows)
    torch.testing.assert_close(out[:, L], want.tokens)
    assert (out[1::2, L] == RESPOND).all() and torch.isin(out[::2, L], torch.tensor(REFUSE)).all()
    torch.testing.assert_close(proc.refusal_probs, refusal_probs(logits, SPEC, logit_bias=bias_rows),
                               rtol=1e-4, atol=1e-7)
    assert not torch.allclose(proc.refusal_probs, refusal_probs(logits, SPEC))  # the bias did something
    # generate repeat-interleaves prompts for num_return_sequences; per-prompt controls must follow.
    out = generate(hf, prompts, proc, max_new_tokens=2, do_sample=True, num_return_sequences=3)
    torch.testing.assert_close(out[:, L], want.tokens.repeat_interleave(3))
    # ... and a batch of distinct prompts that is only a multiple of B must not take them silently.
    with pytest.raises(ValueError, match=rf"generate passed {2 * B} rows that are not 2 copies of each of the {B} "):
        generate(hf, torch.cat([prompts, prompts.flip(1)]), proc, max_new_tokens=2)


def test_sum_mode_and_spec_without_respond(hf, prompts):
    logits = first_logits(hf, prompts)
    total = refusal_probs(logits, SPEC).sum(1).sort().values
    cut = float((total[3] * total[4]).sqrt())
    proc = RefusalLogitsProcessor(SPEC, thresholds=cut, mode="sum")
    out = generate(hf, prompts, proc, max_new_tokens=2)
    torch.testing.assert_close(out[:, L], expected(logits, cut, mode="sum").tokens)
    assert (out[:, L] == RESPOND).sum() == 4

    bare = RefusalSpec(list(REFUSE), None, names=NAMES)
    proc = RefusalLogitsProcessor(bare, thresholds=cut, mode="sum")
    out = generate(hf, prompts, proc, max_new_tokens=2)
    want = expected(logits, cut, mode="sum", spec=bare)
    masked = logits.clone()
    masked[:, list(REFUSE)] = float("-inf")
    answer = want.refused == -1
    # Not refusing without [respond]: the model's own best token with the refusal tokens masked.
    torch.testing.assert_close(out[answer, L], masked[answer].argmax(1))
    torch.testing.assert_close(out[~answer, L], want.tokens[~answer])


# -- sampling ----------------------------------------------------------------------------------------------
def test_sampling_never_emits_control_tokens_after_the_first_position(hf, prompts):
    kw = dict(do_sample=True, temperature=1.3, top_k=0, top_p=1.0, max_new_tokens=12, num_return_sequences=2)
    torch.manual_seed(0)
    with torch.no_grad():
        free_run = hf.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)
    assert not no_controls(free_run[:, L + 1:]), "without the processor the model does emit control tokens"

    logits = first_logits(hf, prompts)
    thr = split_thresholds(refusal_probs(logits, SPEC))
    want = expected(logits, thr).tokens.repeat_interleave(2)
    for seed in range(2):
        torch.manual_seed(seed)
        proc = RefusalLogitsProcessor(SPEC, thresholds=thr)
        out = generate(hf, prompts, proc, **kw)
        torch.testing.assert_close(out[:, L], want)  # forced: sampling cannot override the decision
        assert no_controls(out[:, L + 1:])


def test_free_mode_samples_controls_and_reports_the_drawn_category(prompts):
    # One prompt drawn N times inside generate: each control token's share must follow the model's softmax.
    # A larger control gain gives the controls enough mass for a chi-square test with a few hundred draws.
    hf, N, prompt = _tiny_llama(control_gain=20.0), 600, prompts[4:5]
    torch.manual_seed(3)
    proc = RefusalLogitsProcessor(SPEC, mode="free")
    out = generate(hf, prompt, proc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                   max_new_tokens=2, num_return_sequences=N)
    first = out[:, L]
    drawn = torch.tensor([REFUSE.index(t) if t in REFUSE else -1 for t in first.tolist()], dtype=torch.int32)
    torch.testing.assert_close(proc.refused, drawn)
    assert no_controls(out[:, L + 1:])
    p = torch.softmax(first_logits(hf, prompt)[0].double(), 0)
    tested = [t for t in CONTROL if p[t] * N >= 5]  # the rest fall into the "other" bin
    assert len(tested) >= 3, "the tiny model should give most control tokens some mass"
    expect = torch.tensor([p[t].item() for t in tested] + [1 - p[tested].sum().item()]) * N
    seen = torch.tensor([(first == t).sum().item() for t in tested] + [0.0])
    seen[-1] = N - seen[:-1].sum()
    chi2 = float(((seen - expect) ** 2 / expect).sum())
    assert chi2 < chi2_critical(len(tested)), (chi2, seen.tolist(), expect.tolist())


def test_free_mode_decision_pending_until_the_next_step(hf, prompts):
    proc = RefusalLogitsProcessor(SPEC, mode="free")
    generate(hf, prompts, proc, max_new_tokens=1)
    assert (proc.refused == PENDING).all()


# -- bookkeeping ------------------------------------------------------------------------------------------
def test_reuse_across_generate_calls_and_raw_logits_untouched(hf, prompts):
    proc = RefusalLogitsProcessor(SPEC, thresholds=0.0)  # always refuse: first scores become one-hot
    generate(hf, prompts, proc, max_new_tokens=2)
    longer = torch.cat([prompts[:, :3], prompts], 1)  # same batch size, longer prompt: a new generation
    with torch.no_grad():
        res = hf.generate(longer, attention_mask=torch.ones_like(longer), logits_processor=[proc],
                          max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    logits = first_logits(hf, longer)
    assert proc.prompt_length == L + 3
    torch.testing.assert_close(proc.refusal_probs, refusal_probs(logits, SPEC), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(res.sequences[:, L + 3], expected(logits, 0.0).tokens)
    # generate keeps the scores it passed us as output_logits: they must still be the model's logits.
    torch.testing.assert_close(res.logits[0], logits, rtol=1e-4, atol=1e-4)
    assert no_controls(res.sequences[:, L + 4:])


def test_next_turn_extending_the_last_conversation_is_a_new_generation(hf, prompts):
    # a chat's second generate call: its prompt is the first call's whole output plus new tokens
    proc = RefusalLogitsProcessor(SPEC, thresholds=0.0)  # always refuse
    first = generate(hf, prompts[:2], proc, max_new_tokens=3)
    turn2 = torch.cat([first, prompts[:2, :4]], 1)
    out = generate(hf, turn2, proc, max_new_tokens=2)
    logits = first_logits(hf, turn2)
    assert proc.prompt_length == turn2.shape[1]
    torch.testing.assert_close(out[:, turn2.shape[1]], expected(logits, 0.0).tokens)
    torch.testing.assert_close(proc.refusal_probs, refusal_probs(logits, SPEC), rtol=1e-4, atol=1e-7)


def test_new_prompts_one_token_longer_than_the_last_call_are_a_new_generation(hf, prompts):
    # same length as a continuation of the previous call would have: only the content tells them apart
    proc = RefusalLogitsProcessor(SPEC, thresholds=0.0)
    generate(hf, prompts[:2], proc, max_new_tokens=1)
    other = torch.cat([prompts[4:6], prompts[6:8, :1]], 1)
    out = generate(hf, other, proc, max_new_tokens=2)
    logits = first_logits(hf, other)
    assert proc.prompt_length == L + 1
    torch.testing.assert_close(out[:, L + 1], expected(logits, 0.0).tokens)
    torch.testing.assert_close(proc.refusal_probs, refusal_probs(logits, SPEC), rtol=1e-4, atol=1e-7)


def test_free_mode_invalid_rows_stay_invalid():
    scores = torch.randn(2, V, generator=torch.Generator().manual_seed(3))
    scores[1, 9] = float("nan")
    proc = RefusalLogitsProcessor(SPEC, mode="free", prompt_length=4)
    proc(torch.zeros(2, 4, dtype=torch.long), scores)
    assert proc.refused.tolist() == [PENDING, -2]
    proc(torch.zeros(2, 5, dtype=torch.long), torch.randn(2, V))   # the next step resolves pending rows only
    assert proc.refused[1] == -2 and proc.refused[0] in (-1, 0, 1, 2)


def test_thresholds_file_brings_its_mode(tmp_path, prompts, hf):
    from rtkern.thresholds import save_thresholds
    path = save_thresholds(tmp_path / "t.json", {n: 0.3 for n in NAMES}, mode="sum")
    logits = first_logits(hf, prompts)
    for thresholds in (path, str(path)):
        proc = RefusalLogitsProcessor(SPEC, thresholds=thresholds)
        out = generate(hf, prompts, proc, max_new_tokens=1)
        torch.testing.assert_close(out[:, L], expected(logits, 0.3, mode="sum").tokens)
    with pytest.raises(ValueError, match="disagrees with the thresholds file's mode 'sum'"):
        RefusalLogitsProcessor(SPEC, thresholds=path, mode="category")
    with pytest.raises(FileNotFoundError, match="thresholds file not found"):
        RefusalLogitsProcessor(SPEC, thresholds=tmp_path / "missing.json")


def test_invalid_rows_only_lose_their_control_tokens():
    scores = torch.randn(3, V, generator=torch.Generator().manual_seed(2))
    scores[1, 7] = float("nan")
    proc = RefusalLogitsProcessor(SPEC, thresholds=0.5, prompt_length=4)
    out = proc(torch.zeros(3, 4, dtype=torch.long), scores)
    assert proc.refused[1] == -2
    assert torch.isinf(out[1, list(CONTROL)]).all() and (out[1, list(CONTROL)] < 0).all()
    rest = torch.ones(V, dtype=torch.bool)
    rest[list(CONTROL)] = False
    torch.testing.assert_close(out[1, rest], scores[1, rest], equal_nan=True)


def test_beam_search_starts_every_beam_with_the_decision(hf, prompts):
    logits = first_logits(hf, prompts[:4])
    thr = split_thresholds(refusal_probs(first_logits(hf, prompts), SPEC))
    proc = RefusalLogitsProcessor(SPEC, thresholds=thr)
    out = generate(hf, prompts[:4], proc, num_beams=3, num_return_sequences=3, max_new_tokens=4)
    torch.testing.assert_close(out[:, L], expected(logits, thr).tokens.repeat_interleave(3))
    assert no_controls(out[:, L + 1:])


def test_direct_calls_dtypes_and_explicit_prompt_length():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 290, (4, 5), generator=g)
    scores = torch.randn(4, V, generator=g) * 3
    scores[:, list(REFUSE)] += torch.tensor([2.0, 4.0, 6.0])
    thr = torch.tensor([0.05, 0.3, 0.9])
    proc = RefusalLogitsProcessor(SPEC, thresholds=thr, prompt_length=5)
    ref = proc(ids, scores)
    assert ref.dtype == torch.float32 and not torch.equal(ref, scores)
    want = expected(scores, thr)
    torch.testing.assert_close(ref.argmax(1), want.tokens)
    assert torch.isinf(ref).sum() == 4 * (V - 1)  # one-hot rows (every row forced: spec has [respond])
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        out = RefusalLogitsProcessor(SPEC, thresholds=thr)(ids, scores.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.argmax(1), want.tokens)
    nxt = torch.cat([ids, ref.argmax(1, keepdim=True)], 1)
    later = proc(nxt, scores)
    assert torch.isinf(later[:, list(CONTROL)]).all() and torch.isfinite(later[:, :300]).all()
    with pytest.raises(ValueError, match="fewer than prompt_length"):
        proc(ids[:, :3], scores)
    bad = scores.clone()
    bad[1, 7] = float("nan")
    RefusalLogitsProcessor(SPEC)(ids, bad)
    p = RefusalLogitsProcessor(SPEC)
    p(ids, bad)
    assert p.refused[1] == -2 and p.refusal_probs[1].isnan().all() and p.refused[0] != -2


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_backend_same_decisions(hf, prompts, device):
    logits = first_logits(hf, prompts).to(device)
    thr = split_thresholds(refusal_probs(logits.cpu(), SPEC))
    ids = prompts.to(device)
    a = RefusalLogitsProcessor(SPEC, thresholds=thr, backend="torch")
    b = RefusalLogitsProcessor(SPEC, thresholds=thr, backend="triton")
    torch.testing.assert_close(b(ids, logits), a(ids, logits))
    torch.testing.assert_close(b.refused, a.refused)
    torch.testing.assert_close(b.refusal_probs, a.refusal_probs, rtol=1e-5, atol=1e-7)


def test_bad_arguments(hf, prompts):
    with pytest.raises(TypeError, match="RefusalSpec"):
        RefusalLogitsProcessor([300, 301])
    with pytest.raises(ValueError, match="unknown category 'nope'"):
        RefusalLogitsProcessor(SPEC, thresholds={"nope": 0.2})
    with pytest.raises(ValueError, match="thresholds must be >= 0"):
        RefusalLogitsProcessor(SPEC, thresholds=float("nan"))
    with pytest.raises(ValueError, match="thresholds must be >= 0"):
        RefusalLogitsProcessor(SPEC, thresholds=[0.1, -0.2, 0.3])
    with pytest.raises(ValueError, match="thresholds must be a scalar"):
        RefusalLogitsProcessor(SPEC, thresholds=[0.1, 0.2])
    with pytest.raises(TypeError, match="real numbers"):
        RefusalLogitsProcessor(SPEC, thresholds={"Incomplete requests": "high"})
    with pytest.raises(ValueError, match="mode must be one of"):
        RefusalLogitsProcessor(SPEC, mode="strict")
    with pytest.raises(ValueError, match="disagree on the number of prompts"):
        RefusalLogitsProcessor(SPEC, thresholds=torch.zeros(3, 3), mode=["category", "sum"])
    with pytest.raises(ValueError, match="prompt_length"):
        RefusalLogitsProcessor(SPEC, prompt_length=0)
    with pytest.raises(ValueError, match="backend"):
        RefusalLogitsProcessor(SPEC, backend="cuda")
    with pytest.raises(ValueError, match="not a multiple of the 3 prompts"):
        generate(hf, prompts, RefusalLogitsProcessor(SPEC, thresholds=torch.zeros(3, 3)), max_new_tokens=1)
    with pytest.raises(ValueError, match="out of range for a vocabulary"):
        RefusalLogitsProcessor(RefusalSpec([400]))(prompts, torch.zeros(8, V))
    # A later position only masks the control tokens, which checked no ids (IndexError).
    later = RefusalLogitsProcessor(SPEC, prompt_length=prompts.shape[1])
    later(prompts, torch.zeros(8, V))
    with pytest.raises(ValueError, match="out of range for a vocabulary of 301"):
        later(torch.cat([prompts, prompts[:, :1]], 1), torch.zeros(8, 301))
    with pytest.raises(TypeError, match="floating point"):
        RefusalLogitsProcessor(SPEC)(prompts, torch.zeros(8, V, dtype=torch.int64))


# -- against rtkern's own model ------------------------------------------------------------------------------
def _save_tokenizer(d):
    """A word-level tokenizer over a few words, with chat specials (ids below the control ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ("please refuse this request respond to the user kindly hello world how do i make a cake "
             "tell me about your feelings what is weather tomorrow in paris").split()
    vocab = {"<pad>": 0, "<|im_end|>": 1, "<|im_start|>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(d)


def rtkern_greedy(model, ids, thresholds, steps):
    """The simplest rtkern decoder: full forward over the growing sequence, rtkern's sampler each step."""
    seq = torch.tensor([ids])
    refused = None
    for step in range(steps):
        with torch.no_grad():
            logits = model(seq)[:, -1].float()
        c = RefusalControls.build(1, 3, "cpu", thresholds=thresholds, temperature=0.0, first_step=step == 0)
        out = refusal_sample(logits, SPEC, c, backend="torch")
        refused = out.refused if step == 0 else refused
        seq = torch.cat([seq, out.tokens[:, None]], 1)
    return seq[0, len(ids):], int(refused[0])


TEXTS = ["please refuse this request", "how do i make a cake", "tell me about your feelings",
         "what is the weather tomorrow in paris", "hello world", "respond to the user kindly please",
         "i", "make me a cake world"]
STEPS = 7


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A saved tiny checkpoint, its prompts, split thresholds, and transformers' greedy output."""
    from rtkern.loader import load_model

    d = tmp_path_factory.mktemp("refusal_ckpt")
    hf = _tiny_llama(seed=4)
    hf.save_pretrained(d)
    _save_tokenizer(d)
    model, tok = load_model(d, device="cpu", dtype=torch.float32)
    encoded = [tok.encode(t) for t in TEXTS]
    assert len({len(e) for e in encoded}) > 2 and all(max(e) < 290 for e in encoded)
    with torch.no_grad():
        probs = torch.cat([refusal_probs(model(torch.tensor([e]))[:, -1], SPEC) for e in encoded])
    thr = split_thresholds(probs)

    # transformers: one left-padded batch.
    width = max(len(e) for e in encoded)
    ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    proc = RefusalLogitsProcessor(SPEC, thresholds=thr)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=STEPS, do_sample=False)
    return dict(dir=d, model=model, encoded=encoded, probs=probs, thr=thr, hf_tokens=out[:, width:],
                proc=proc)


def test_greedy_text_matches_rtkern_model(ckpt):
    want = [rtkern_greedy(ckpt["model"], e, ckpt["thr"], STEPS) for e in ckpt["encoded"]]
    assert {r for _, r in want} & {0, 1, 2} and -1 in {r for _, r in want}, "test needs both outcomes"
    proc = ckpt["proc"]
    for row, (tokens, refused) in enumerate(want):
        assert ckpt["hf_tokens"][row].tolist() == tokens.tolist(), f"prompt {TEXTS[row]!r}"
        assert int(proc.refused[row]) == refused
    torch.testing.assert_close(proc.refusal_probs, ckpt["probs"], rtol=1e-4, atol=1e-6)


def test_greedy_text_matches_rtkern_engine(ckpt):
    engine_mod = pytest.importorskip("rtkern.engine")
    if not hasattr(engine_mod, "Engine"):
        pytest.skip("rtkern.engine has no Engine")
    from rtkern.loader import load_model

    model, tok = load_model(ckpt["dir"], device="cpu", dtype=torch.float32)  # the engine adds a KV cache
    engine = engine_mod.Engine(model, tok, SPEC, cuda_graphs=False, max_batch=8)
    params = engine_mod.SamplingParams(thresholds=ckpt["thr"].tolist(), temperature=0.0, max_new_tokens=STEPS,
                                       ignore_eos=True)
    results = engine.generate(ckpt["encoded"], params, chat=False)
    proc = ckpt["proc"]
    for row, res in enumerate(results):
        assert res.tokens == ckpt["hf_tokens"][row].tolist(), f"prompt {TEXTS[row]!r}"
        assert res.refused == int(proc.refused[row])


def test_direct_calls_mode_and_shape_bookkeeping():
    g = torch.Generator().manual_seed(6)
    scores = torch.randn(2, V, generator=g)
    ids = torch.zeros(2, 4, dtype=torch.long)
    # sum rows are decided now, never PENDING; free rows wait for the drawn token.
    proc = RefusalLogitsProcessor(SPEC, thresholds=0.0, mode=["sum", "free"], prompt_length=4)
    proc(ids, scores)
    assert proc.refused[0] in (0, 1, 2) and proc.refused[1] == PENDING
    # A later call with another number of rows cannot resolve the pending row (no row to read it from).
    proc(torch.zeros(3, 5, dtype=torch.long), torch.randn(3, V, generator=g))
    assert proc.refused[1] == PENDING
    # Per-prompt logit_bias alone sets the number of prompts.
    bias = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    p = RefusalLogitsProcessor(SPEC, thresholds=0.0, logit_bias=bias, prompt_length=4)
    p(ids, scores)
    torch.testing.assert_close(p.refusal_probs, refusal_probs(scores, SPEC, logit_bias=bias))


def test_bad_modes_prompt_length_and_call_arguments(tmp_path):
    from rtkern.thresholds import save_thresholds
    path = save_thresholds(tmp_path / "t.json", {n: 0.3 for n in NAMES}, mode="sum")
    with pytest.raises(ValueError, match="disagrees with the thresholds file's mode 'sum'"):
        RefusalLogitsProcessor(SPEC, thresholds=path, mode=["sum", "category"])
    RefusalLogitsProcessor(SPEC, thresholds=path, mode=["sum", "sum"])
    with pytest.raises(TypeError, match="non-empty sequence"):
        RefusalLogitsProcessor(SPEC, mode=[])
    with pytest.raises(ValueError, match="prompt_length"):
        RefusalLogitsProcessor(SPEC, prompt_length=True)
    proc = RefusalLogitsProcessor(SPEC)
    with pytest.raises(ValueError, match="same R"):
        proc(torch.zeros(2, 4, dtype=torch.long), torch.zeros(3, V))
    with pytest.raises(TypeError, match="must be tensors"):
        proc([[0, 1]], torch.zeros(1, V))
