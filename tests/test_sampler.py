"""Fused refusal sampler: Triton kernel vs the PyTorch reference, semantics, statistics, invariance."""
import math
import zlib

import pytest
import torch

from conftest import DEVICE, ON_GPU
from rtkern import RefusalControls, RefusalSpec, SampleOutput, apply_refusal_, pack_vocab_mask, refusal_sample
from rtkern.kernels.refusal_sampler import refusal_sample_launch
from rtkern.reference import row_uniform, sample_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# On the CPU the interpreter runs every program in Python: keep the big shapes for the GPU.
SHAPES = [(1, 111), (3, 1000), (64, 1000), (3, 49158), (257, 111)]
SHAPES_GPU = [(64, 32000), (257, 49158), (1, 128256), (64, 128256)]


def kernel(logits, spec, controls, block=None, splits=None) -> SampleOutput:
    out = SampleOutput.empty(logits.shape[0], spec.num_categories, logits.device)
    refusal_sample_launch(logits, spec.ids_tensor(logits.device), spec.num_categories, controls.thresholds,
                          controls.logit_bias, controls.mode, controls.temperature, controls.first_step,
                          controls.seed, controls.position, controls.vocab_mask, out.tokens,
                          out.refusal_probs, out.refused, False, block, splits)
    return out


def make_spec(V, C, respond, gen):
    ids = torch.randperm(V, generator=gen)[: C + 1].tolist()
    return RefusalSpec(ids[:C], ids[C] if respond else None)


def make_case(B, V, C, dtype, gen, *, respond=True, bias=False, mask=False):
    spec = make_spec(V, C, respond, gen)
    logits = torch.randn(B, V, generator=gen) * 3
    # Push the refusal tokens into the range where decisions vary from row to row.
    logits[:, list(spec.refusal_ids)] += torch.rand(B, C, generator=gen) * 12 - 2
    vocab_mask = None
    if mask:
        allowed = torch.rand(B, V, generator=gen) < torch.rand(B, 1, generator=gen).clamp_min(0.02)
        vocab_mask = pack_vocab_mask(allowed)
    temperature = torch.where(torch.rand(B, generator=gen) < 0.25, 0.0, torch.rand(B, generator=gen) * 1.7 + 0.3)
    controls = RefusalControls.build(
        B, C, DEVICE, thresholds=torch.rand(B, C, generator=gen) * 0.7,
        logit_bias=(torch.randn(B, C, generator=gen) * 2) if bias else 0.0,
        mode=torch.randint(0, 3, (B,), generator=gen).int(), temperature=temperature,
        first_step=torch.rand(B, generator=gen) < 0.6, seed=torch.randint(0, 2**62, (B,), generator=gen),
        position=torch.randint(0, 2**40, (B,), generator=gen),
        vocab_mask=vocab_mask)
    return logits.to(dtype).to(DEVICE), spec, controls


def cdf_interval(logits, spec, controls, row, token):
    """(low, high, u): the token's CDF interval in the sampler's fixed order, computed in float64."""
    V = logits.shape[1]
    z = logits[row].double().clone()
    rid = list(spec.refusal_ids)
    z[rid] += controls.logit_bias[row].double()
    ctl = list(spec.control_ids)
    ordinary = torch.ones(V, dtype=torch.bool, device=z.device)
    ordinary[ctl] = False
    allowed = ordinary.clone()
    if controls.vocab_mask is not None:
        from rtkern import unpack_vocab_mask
        allowed &= unpack_vocab_mask(controls.vocab_mask[row:row + 1], V)[0]
    free_first = bool(controls.first_step[row]) and int(controls.mode[row]) == 2
    order = torch.cat([torch.arange(V, device=z.device)[ordinary], torch.tensor(ctl, device=z.device)])
    ok = torch.cat([allowed[ordinary], torch.full((len(ctl),), free_first, device=z.device)])
    inv_t = 1.0 / float(controls.temperature[row])
    zz = z[order]
    w = torch.where(ok, torch.exp((zz - zz[ok].max()) * inv_t), 0.0)
    cum = torch.cumsum(w, 0) / w.sum()
    k = int((order == token).nonzero()[0])
    assert bool(ok[k]), f"row {row}: token {token} is not allowed"
    u = float(row_uniform(controls.seed[row:row + 1], controls.position[row:row + 1])[0])
    return (float(cum[k - 1]) if k else 0.0), float(cum[k]), u


def assert_matches_reference(logits, spec, controls, out):
    ref = sample_reference(logits, spec, controls, dtype=torch.float64)
    p, pr = out.refusal_probs, ref.refusal_probs
    assert torch.equal(torch.isnan(p), torch.isnan(pr))
    torch.testing.assert_close(p.nan_to_num(), pr.nan_to_num(), rtol=2e-5, atol=2e-7)
    # Rows whose decision sits within rounding of a threshold may legitimately differ.
    pr64 = pr.double()
    thr = controls.thresholds.double()
    near = ((pr64 - thr).abs() < 1e-5).any(1) | ((pr64.sum(1) - thr[:, 0]).abs() < 1e-5)
    near &= controls.first_step & (controls.mode != 2)
    assert near.sum() <= max(2, logits.shape[0] // 20), "too many rows sit on a threshold"
    mismatch = ((out.tokens != ref.tokens) | (out.refused != ref.refused)) & ~near
    for row in mismatch.nonzero().flatten().tolist():
        # Only a sampled token may differ, and only at a CDF boundary: both are then correct draws.
        tok, rtok = int(out.tokens[row]), int(ref.tokens[row])
        assert tok >= 0 and rtok >= 0 and float(controls.temperature[row]) > 0, (row, tok, rtok)
        low, high, u = cdf_interval(logits, spec, controls, row, tok)
        assert low - 1e-5 <= u <= high + 1e-5, f"row {row}: u={u} outside [{low}, {high}] of token {tok}"
    assert mismatch.sum() <= max(1, logits.shape[0] // 50)


@pytest.mark.parametrize("shape", SHAPES + (SHAPES_GPU if ON_GPU else []))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("flags", ["plain", "bias", "mask", "bias+mask+norespond"])
def test_kernel_matches_reference(shape, dtype, flags):
    B, V = shape
    # crc32, not hash(): str hashes are salted per process, and a failure must replay.
    gen = torch.Generator().manual_seed(zlib.crc32(f"{B},{V},{dtype},{flags}".encode()))
    C = 5 if V > 200 else 2
    logits, spec, controls = make_case(B, V, C, dtype, gen, respond="norespond" not in flags,
                                       bias="bias" in flags, mask="mask" in flags)
    assert_matches_reference(logits, spec, controls, kernel(logits, spec, controls))


@pytest.mark.parametrize("block,splits", [(128, 1), (128, 3), (256, 8), (512, 2)])
def test_tiling_and_splits_do_not_change_results(block, splits):
    gen = torch.Generator().manual_seed(7)
    logits, spec, controls = make_case(16, 1000, 3, torch.float32, gen, mask=True, bias=True)
    out = kernel(logits, spec, controls, block=block, splits=splits)
    assert_matches_reference(logits, spec, controls, out)
    default = kernel(logits, spec, controls)
    assert torch.equal(out.tokens, default.tokens) and torch.equal(out.refused, default.refused)
    torch.testing.assert_close(out.refusal_probs, default.refusal_probs, rtol=1e-5, atol=1e-7)


def test_row_stride_and_public_api():
    gen = torch.Generator().manual_seed(3)
    logits, spec, controls = make_case(4, 300, 2, torch.float32, gen)
    wide = torch.full((4, 512), float("nan"), device=DEVICE)
    wide[:, :300] = logits
    view = wide[:, :300]
    out = refusal_sample(view, spec, controls, backend="triton")
    assert_matches_reference(logits, spec, controls, out)
    ref = refusal_sample(view, spec, controls, backend="torch")
    assert torch.equal(ref.tokens, sample_reference(logits, spec, controls).tokens)


def test_out_buffers_are_filled_in_place():
    gen = torch.Generator().manual_seed(4)
    logits, spec, controls = make_case(6, 500, 2, torch.bfloat16, gen)
    for backend in ("triton", "torch"):
        want = refusal_sample(logits, spec, controls, backend=backend)
        out = SampleOutput.empty(6, 2, DEVICE)
        for t, garbage in zip(out, (-7, float("nan"), -7)):
            t.fill_(garbage)
        res = refusal_sample(logits, spec, controls, out=out, backend=backend)
        assert all(a is b for a, b in zip(res, out))
        assert torch.equal(out.tokens, want.tokens) and torch.equal(out.refused, want.refused)
        assert torch.equal(out.refusal_probs, want.refusal_probs)


@pytest.mark.parametrize("block,splits", [(None, None), (128, 1), (128, 3)])
def test_greedy_is_argmax_with_lowest_id_on_ties(block, splits):
    V = 777
    spec = RefusalSpec([5, 100], respond_id=200)
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(8))
    logits[:, 5] = 50.0  # control tokens are masked on later steps, however large
    logits[1, [300, 301, 700]] = 40.0  # same tile and another tile: lowest id wins
    logits[2, [650, 129]] = 40.0       # the tie's lower id sits in an earlier tile and split
    logits[3, 600] = 50.0              # free first step: control 5 ties an ordinary token and is lower
    logits[4, 5], logits[4, [100, 50]] = 0.0, 45.0  # free first step: ordinary 50 beats control 100
    logits = logits.to(DEVICE)
    free = torch.tensor([False, False, False, True, True, False, False, False])
    controls = RefusalControls.build(8, 2, DEVICE, temperature=0.0, first_step=free,
                                     mode=["free" if f else "category" for f in free.tolist()])
    out = kernel(logits, spec, controls, block=block, splits=splits)
    masked = logits.clone()
    masked[:, [5, 100, 200]] = float("-inf")
    later = ~free.to(DEVICE)
    assert torch.equal(out.tokens[later], masked.argmax(1)[later])
    assert out.tokens[1:5].tolist() == [300, 129, 5, 50]
    assert out.refused.tolist() == [-1, -1, -1, 0, -1, -1, -1, -1]
    assert torch.equal(out.tokens, sample_reference(logits, spec, controls).tokens)


@pytest.mark.parametrize("splits", [1, 2])
def test_a_tile_of_control_tokens_only(splits):
    # Special tokens often sit at the end of the vocabulary: here the last tile holds only control tokens.
    # Its partial has no ordinary token and must add nothing (not NaN) to the probabilities and the draw.
    V, B = 130, 6
    spec = RefusalSpec([5, 128], respond_id=129)
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(B, V, generator=gen) * 3
    logits[:, [128, 129]] += 2.0
    controls = RefusalControls.build(
        B, 2, DEVICE, thresholds=0.3, mode=torch.tensor([0, 1, 2, 0, 1, 2]).int(),
        temperature=torch.tensor([0.0, 0.7, 1.0, 0.0, 1.3, 0.5]),
        first_step=torch.tensor([True, True, True, False, False, False]), seed=torch.arange(B) * 31 + 1)
    logits = logits.to(DEVICE)
    out = kernel(logits, spec, controls, block=128, splits=splits)
    assert not torch.isnan(out.refusal_probs).any() and (out.tokens >= 0).all()
    assert_matches_reference(logits, spec, controls, out)


def test_greedy_ties_between_control_tokens_take_the_lowest_id():
    # free first step at temperature 0: two control tokens tie at the top; lowest id wins, as among ordinary ones
    spec = RefusalSpec([100, 5], respond_id=3)
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(12))
    logits[0, [100, 5]] = 30.0
    logits[1, [100, 3]] = 30.0
    logits[2, [3, 5, 100]] = 30.0
    logits = logits.to(DEVICE)
    controls = RefusalControls.build(3, 2, DEVICE, temperature=0.0, mode="free", first_step=True)
    out = kernel(logits, spec, controls)
    assert out.tokens.tolist() == [5, 3, 3]
    assert out.refused.tolist() == [1, -1, -1]
    assert torch.equal(out.tokens, sample_reference(logits, spec, controls).tokens)


@pytest.mark.parametrize("splits", [1, 3])
def test_zero_uniform_draw_skips_leading_tiles_without_mass(splits):
    # u = 0 must land on the first token with weight. With 16-token tiles the leading tiles here have no
    # mass (masked out, or at -inf), so the scan over tile masses must skip a tile whose mass is still 0.
    seed = 19389801                    # row_uniform(seed, position 0) == 0 exactly
    assert row_uniform(torch.tensor([seed]), torch.tensor([0])).tolist() == [0.0]
    spec = RefusalSpec([70])
    logits = torch.randn(2, 80, generator=torch.Generator().manual_seed(13))
    logits[1, :32] = float("-inf")
    allowed = torch.ones(2, 80, dtype=torch.bool)
    allowed[0, :21] = False
    controls = RefusalControls.build(2, 1, DEVICE, first_step=False, temperature=0.8, seed=seed,
                                     vocab_mask=pack_vocab_mask(allowed))
    out = kernel(logits.to(DEVICE), spec, controls, block=16, splits=splits)
    assert out.tokens.tolist() == [21, 32]


def test_largest_uniform_draw_lands_on_the_last_allowed_token():
    # u = 1 - 2**-24 puts the target within an ulp of the row's mass. Stage 1 sums a tile as a tree and
    # stage 2 re-reads it as a running sum, so the running sum can stop short of the target (it does on
    # the interpreter for these logits): the in-tile search must then fall back to the last token with
    # weight, which is also the exact inverse-CDF answer, never to the tile's argmax.
    seed = 49214909                    # row_uniform(seed, position 0) == 1 - 2**-24
    assert row_uniform(torch.tensor([seed]), torch.tensor([0])).tolist() == [1 - 2**-24]
    V = 4000
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3)) * 0.5
    spec = RefusalSpec([0])
    allowed = torch.ones(3, V, dtype=torch.bool)
    allowed[1, -5:] = False
    logits[2, -7:] = float("-inf")
    controls = RefusalControls.build(3, 1, DEVICE, first_step=False, temperature=1.0, seed=seed,
                                     vocab_mask=pack_vocab_mask(allowed))
    out = kernel(logits.to(DEVICE), spec, controls)
    assert out.tokens.tolist() == [V - 1, V - 6, V - 8]
    assert torch.equal(out.tokens, sample_reference(logits.to(DEVICE), spec, controls).tokens)


def refusal_controls(B, mode, thr, **kw):
    return RefusalControls.build(B, 2, DEVICE, thresholds=thr, mode=mode, **kw)


def probs_logits(p, V=64, ids=(3, 9)):
    """Logits whose softmax gives refusal probabilities ``p`` (rest spread evenly)."""
    rest = 1.0 - sum(p)
    z = torch.full((V,), math.log(rest / (V - len(p))))
    for i, pi in zip(ids, p):
        z[i] = math.log(pi)
    return z


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_decision_rules(backend):
    spec = RefusalSpec([3, 9], respond_id=11, names=["a", "b"])
    rows = [  # (p, thresholds, mode, expected refused)
        ((0.30, 0.50), (0.2, 0.4), "category", 1),  # both pass: larger p wins
        ((0.30, 0.50), (0.2, 0.6), "category", 0),  # only 0 passes
        ((0.30, 0.50), (0.2, 1.5), "category", 0),  # threshold > 1 switches b off
        ((0.30, 0.30), (0.1, 0.1), "category", 0),  # tie: lowest category
        ((0.30, 0.50), (0.9, 0.9), "category", -1),
        ((0.30, 0.35), (0.6, 9.0), "sum", 1),       # 0.65 >= 0.6, argmax is b
        ((0.30, 0.25), (0.6, 0.0), "sum", -1),      # sum reads thresholds[0] only
    ]
    logits = torch.stack([probs_logits(p) for p, *_ in rows]).to(DEVICE)
    controls = RefusalControls.build(len(rows), 2, DEVICE, thresholds=torch.tensor([r[1] for r in rows]),
                                     mode=[r[2] for r in rows], temperature=1.0)
    out = refusal_sample(logits, spec, controls, backend=backend)
    expect = torch.tensor([r[3] for r in rows], dtype=torch.int32, device=DEVICE)
    assert torch.equal(out.refused, expect)
    want_tok = torch.tensor([[3, 9][r] if r >= 0 else 11 for r in expect.tolist()], device=DEVICE)
    assert torch.equal(out.tokens, want_tok)
    torch.testing.assert_close(out.refusal_probs, torch.tensor([r[0] for r in rows], device=DEVICE),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_logit_bias_moves_probabilities_and_decisions(backend):
    spec = RefusalSpec([3, 9], respond_id=11)
    z = probs_logits((0.1, 0.1)).to(DEVICE)[None].expand(2, -1).contiguous()
    controls = RefusalControls.build(2, 2, DEVICE, thresholds=0.5, logit_bias=torch.tensor([[0.0, 0.0], [3.0, 0.0]]))
    out = refusal_sample(z, spec, controls, backend=backend)
    e3 = 0.1 * math.exp(3.0)
    p0 = e3 / (e3 + 0.9)
    torch.testing.assert_close(out.refusal_probs[1, 0].cpu(), torch.tensor(p0), rtol=1e-5, atol=0)
    assert out.refused.tolist() == [-1, 0]


def test_no_respond_token_samples_without_refusal_tokens():
    spec = RefusalSpec([3, 9])
    B = 200
    z = probs_logits((0.2, 0.2)).to(DEVICE)[None].expand(B, -1).contiguous()
    controls = RefusalControls.build(B, 2, DEVICE, thresholds=0.9, seed=torch.arange(B))
    out = kernel(z, spec, controls)
    assert (out.refused == -1).all()
    assert not torch.isin(out.tokens, torch.tensor([3, 9], device=DEVICE)).any()
    assert len(set(out.tokens.tolist())) > 20


def test_free_mode_draws_control_tokens_and_reports_them():
    spec = RefusalSpec([3, 9], respond_id=11)
    B = 400 if ON_GPU else 250
    z = probs_logits((0.3, 0.2)).to(DEVICE)
    z[11] = math.log(0.3)
    z = z[None].expand(B, -1).contiguous()
    controls = RefusalControls.build(B, 2, DEVICE, mode="free", seed=torch.arange(B), thresholds=0.0)
    out = kernel(z, spec, controls)
    tok = out.tokens
    assert torch.equal(out.refused, torch.where(tok == 3, 0, torch.where(tok == 9, 1, -1)).int())
    p = torch.softmax(z[0].double(), 0)[[3, 9, 11]].tolist()
    for t, pt in zip((3, 9, 11), p):
        frac = (tok == t).double().mean().item()
        assert abs(frac - pt) < 4 * math.sqrt(pt * (1 - pt) / B), (t, frac, pt)


def chi2_critical(df, z=3.719):
    # Wilson-Hilferty quantile; z=3.719 is p=1e-4, so a correct sampler fails 1 run in 10,000.
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("case", ["later", "later-masked-T0.6", "free-first"])
def test_sampled_frequencies_follow_the_masked_softmax(case):
    # The interpreter runs programs one by one (~30 ms each): fewer bins need fewer draws on the CPU.
    V, B = (40, 6000) if ON_GPU else (24, 1000)
    gen = torch.Generator().manual_seed(11)
    spec = RefusalSpec([2, 5], respond_id=7)
    z = torch.randn(V, generator=gen) * 1.2
    temperature = 0.6 if "T0.6" in case else 1.0
    allowed = torch.ones(V, dtype=torch.bool)
    if "masked" in case:
        allowed = torch.rand(V, generator=gen) < 0.6
    free = case == "free-first"
    controls = RefusalControls.build(B, 2, DEVICE, mode="free" if free else "category", first_step=free,
                                     temperature=temperature, seed=torch.arange(B) * 7919 + 5,
                                     position=torch.arange(B) % 13,
                                     vocab_mask=pack_vocab_mask(allowed[None].expand(B, -1).contiguous()))
    out = kernel(z.to(DEVICE)[None].expand(B, -1).contiguous(), spec, controls)
    ok = allowed.clone()
    ok[[2, 5, 7]] = free
    expected = torch.where(ok, torch.softmax(z.double() / temperature, 0), 0.0)
    expected /= expected.sum()
    counts = torch.bincount(out.tokens.cpu(), minlength=V).double()
    assert counts[~ok].sum() == 0, "a masked or control token was drawn"
    e, c = expected[ok] * B, counts[ok]
    # Pool the bins expecting fewer than 5 draws: the chi-square law is a poor fit for them.
    small = e < 5
    e = torch.cat([e[~small], e[small].sum()[None]]) if small.any() else e
    c = torch.cat([c[~small], c[small].sum()[None]]) if small.any() else c
    chi2 = float(((c - e) ** 2 / e).sum())
    assert chi2 < chi2_critical(len(e) - 1), chi2


def test_batch_invariance_and_seed_reproducibility():
    gen = torch.Generator().manual_seed(21)
    logits, spec, controls = make_case(37, 900, 3, torch.bfloat16, gen, mask=True, bias=True)
    full = kernel(logits, spec, controls)
    perm = torch.randperm(37, generator=gen).to(DEVICE)
    shuffled = kernel(logits[perm].contiguous(), spec, _take(controls, perm))
    assert torch.equal(shuffled.tokens, full.tokens[perm])
    assert torch.equal(shuffled.refused, full.refused[perm])
    for row in (0, 17, 36):
        idx = torch.tensor([row], device=DEVICE)
        alone = kernel(logits[idx].contiguous(), spec, _take(controls, idx))
        assert int(alone.tokens[0]) == int(full.tokens[row])
        assert torch.equal(alone.refusal_probs[0], full.refusal_probs[row])
    again = kernel(logits, spec, controls)
    assert torch.equal(again.tokens, full.tokens)


@pytest.mark.parametrize("field, bit", [("seed", 0), ("seed", 31), ("seed", 32), ("seed", 62),
                                        ("position", 0), ("position", 32)])
def test_every_bit_of_seed_and_position_keys_the_draw(field, bit):
    # uniform logits over 1000 tokens: two independent draws agree 0.1% of the time
    spec = RefusalSpec([1])
    z = torch.zeros(32, 1000, device=DEVICE)
    base = dict(seed=torch.arange(32) * 7919, position=torch.arange(32) + 3)
    flipped = {**base, field: base[field] ^ (1 << bit)}
    a = kernel(z, spec, RefusalControls.build(32, 1, DEVICE, first_step=False, **base))
    b = kernel(z, spec, RefusalControls.build(32, 1, DEVICE, first_step=False, **flipped))
    assert len(set(a.tokens.tolist())) > 25
    assert (a.tokens != b.tokens).float().mean() > 0.9


def test_row_uniform_known_answers():
    # pins the hash: a change would silently change every seeded generation users have recorded
    from rtkern.reference import row_uniform
    got = row_uniform(torch.tensor([0, 1, 2**40, -7]), torch.tensor([0, 5, 2**33, 123456789]))
    want = torch.tensor([0.00998908281326294, 0.030048847198486328, 0.9923944473266602, 0.6011736989021301])
    assert torch.equal(got, want)


def _take(controls, idx):
    return RefusalControls(**{k: (v[idx].contiguous() if v is not None else None) for k, v in vars(controls).items()})


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_invalid_rows(backend):
    V = 100
    spec = RefusalSpec([3], respond_id=4)
    z = torch.randn(6, V)
    z[0, 50] = float("nan")
    z[1, 60] = float("inf")
    z[2] = float("-inf")
    z[5, :90] = float("-inf")  # still valid: ten finite tokens
    nothing = torch.zeros(6, V, dtype=torch.bool)
    allowed = torch.ones(6, V, dtype=torch.bool)
    allowed[3] = nothing[3]  # later step with an empty mask: nothing to sample
    allowed[4] = nothing[4]  # first step that refuses: the forced token needs no mask
    z[4, 3] = 20.0
    controls = RefusalControls.build(6, 1, DEVICE, first_step=torch.tensor([True, True, True, False, True, False]),
                                     thresholds=0.5, vocab_mask=pack_vocab_mask(allowed), temperature=0.8)
    out = refusal_sample(z.to(DEVICE), spec, controls, backend=backend)
    assert out.tokens.tolist()[:4] == [-1, -1, -1, -1]
    assert out.refused.tolist()[:4] == [-2, -2, -2, -2]
    assert int(out.tokens[4]) == 3 and int(out.refused[4]) == 0
    assert 90 <= int(out.tokens[5]) < 100
    assert torch.isnan(out.refusal_probs[:3]).all() and not torch.isnan(out.refusal_probs[3:]).any()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("scale, temperature", [(1.0, 1e-40), (1e36, 1e-3), (3e37, 1e-30), (1.0, 1e38)])
def test_extreme_temperatures_and_logits_do_not_overflow(backend, scale, temperature):
    # logit / T overflowed to +inf and inf - inf = NaN sampled token 0 instead of the argmax (id 2).
    spec = RefusalSpec([3, 4], respond_id=5)
    z = torch.tensor([[0.0, 1.0, 5.0, 2.0, 0.0, 0.0, -1.0], [0.0, 1.0, 5.0, 2.0, 0.0, 0.0, -1.0]]) * scale
    controls = RefusalControls.build(2, 2, DEVICE, temperature=temperature, first_step=torch.tensor([False, True]),
                                     mode="free", seed=torch.tensor([1, 2]))
    out = refusal_sample(z.to(DEVICE), spec, controls, backend=backend)
    if temperature < 1:
        assert out.tokens.tolist() == [2, 2] and out.refused.tolist() == [-1, -1]
    else:  # T = 1e38: every allowed token is about equally likely, still a valid draw
        assert 0 <= int(out.tokens[0]) < 7 and int(out.tokens[0]) not in (3, 4, 5)
    # The refusal probabilities are taken at temperature 1, whatever the row's temperature.
    ones = RefusalControls.build(2, 2, DEVICE, first_step=torch.tensor([False, True]), mode="free")
    ref = refusal_sample(z.to(DEVICE), spec, ones, backend=backend).refusal_probs
    assert not torch.isnan(out.refusal_probs).any()
    torch.testing.assert_close(out.refusal_probs, ref)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_logit_plus_bias_overflowing_to_inf_is_an_invalid_row(backend):
    spec = RefusalSpec([3, 4], respond_id=5)
    z = torch.zeros(2, 7)
    z[:, 3] = 3e38
    controls = RefusalControls.build(2, 2, DEVICE, logit_bias=torch.tensor([[1e38, 0.0], [-1e38, 0.0]]), mode="free")
    out = refusal_sample(z.to(DEVICE), spec, controls, backend=backend)
    assert out.tokens.tolist() == [-1, 3] and out.refused.tolist() == [-2, 0]
    assert torch.isnan(out.refusal_probs[0]).all() and not torch.isnan(out.refusal_probs[1]).any()
    applied = apply_refusal_(z.to(DEVICE), spec, controls, backend=backend)
    assert applied.tokens.tolist() == [-1, -1] and applied.refused.tolist() == [-2, -1]


def _launch_args(B=2, V=40, C=2, respond=True):
    spec = RefusalSpec([3, 5][:C], 7 if respond else None)
    c = RefusalControls.build(B, C, DEVICE, first_step=False)
    out = SampleOutput.empty(B, C, DEVICE)
    return dict(logits=torch.randn(B, V, device=DEVICE), ctl_ids=spec.ids_tensor(DEVICE), num_refusal=C,
                thresholds=c.thresholds, logit_bias=c.logit_bias, mode=c.mode, temperature=c.temperature,
                first_step=c.first_step, seed=c.seed, position=c.position, vocab_mask=None, tokens=out.tokens,
                probs=out.refusal_probs, refused=out.refused)


@pytest.mark.parametrize("change,exc,match", [
    (dict(logits=torch.randn(2, 40, dtype=torch.float64)), TypeError, r"float16, got torch.float64"),
    (dict(logits=torch.randn(40, 2).t()), ValueError, r"unit stride in V"),
    (dict(num_refusal=3), ValueError, r"thresholds must be torch.float32 \[2, 3\]"),
    (dict(num_refusal=0), ValueError, r"num_refusal must be a positive int, got 0"),
    (dict(ctl_ids=torch.tensor([3, 5, 7, 9], dtype=torch.int32)), ValueError, r"ctl_ids must be torch.int32 \[3\]"),
    (dict(ctl_ids=torch.tensor([3, 5, 7])), ValueError, r"ctl_ids must be torch.int32 \[3\].*got torch.int64"),
    (dict(seed=torch.zeros(3, dtype=torch.int64)), ValueError, r"seed must be torch.int64 \[2\]"),
    (dict(probs=torch.empty(2, 4)[:, ::2]), ValueError, r"probs must be contiguous in its last dim"),
    (dict(vocab_mask=torch.zeros(2, 1, dtype=torch.int32)), ValueError, r"vocab_mask must be torch.int32 \[2, 2\]"),
    (dict(tokens=None), TypeError, r"tokens must be a torch.int64 tensor, got NoneType"),
    (dict(block=100), ValueError, r"block must be a power of two >= 16"),
])
def test_raw_launcher_checks_metadata(change, exc, match):
    args = _launch_args() | {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in change.items()}
    block = args.pop("block", None)
    with pytest.raises(exc, match=match):
        refusal_sample_launch(**args, block=block)


def test_raw_launcher_turns_out_of_vocabulary_ids_into_invalid_rows():
    # Checking the id values would sync with the device: the kernel neither reads them nor emits them.
    args = _launch_args()
    args["ctl_ids"] = torch.tensor([3, 5, 400], dtype=torch.int32, device=DEVICE)
    refusal_sample_launch(**args)
    assert args["tokens"].tolist() == [-1, -1] and args["refused"].tolist() == [-2, -2]
    assert torch.isnan(args["probs"]).all()
    args = _launch_args()
    refusal_sample_launch(**args)
    assert (args["tokens"] >= 0).all() and (args["refused"] == -1).all()


def test_greedy_with_all_allowed_at_minus_inf_is_invalid():
    spec = RefusalSpec([0])
    z = torch.randn(1, 64)
    z[0, 32:] = float("-inf")
    allowed = torch.zeros(1, 64, dtype=torch.bool)
    allowed[0, 40:] = True
    controls = RefusalControls.build(1, 1, DEVICE, temperature=0.0, first_step=False,
                                     vocab_mask=pack_vocab_mask(allowed))
    out = kernel(z.to(DEVICE), spec, controls)
    assert out.tokens.tolist() == [-1] and out.refused.tolist() == [-2]


@pytest.mark.parametrize("bad_id", [-1, 40])
def test_raw_launcher_treats_ids_just_outside_the_vocabulary_as_invalid(bad_id):
    # the bounds are [0, V): id V (one past the last logit) must not be read as a control token
    args = _launch_args()
    assert args["logits"].shape[1] == 40
    args["ctl_ids"] = torch.tensor([3, 5, bad_id], dtype=torch.int32, device=DEVICE)
    refusal_sample_launch(**args)
    assert args["tokens"].tolist() == [-1, -1] and args["refused"].tolist() == [-2, -2]
