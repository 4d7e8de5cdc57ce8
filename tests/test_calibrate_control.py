"""choose_controllable: thresholds under an over-refusal budget that keep every category switchable."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from rtkern import cli
from rtkern.calibrate import OFF, choose_for_max_over_refusal, decisions, switch_off_effect
from rtkern.calibrate_control import choose_controllable, control_holds
from rtkern.loader import load_model
from rtkern.spec import CATEGORIES, RefusalSpec
from rtkern.thresholds import load_thresholds
from tiny import save_scoring_model, write_labelled_jsonl


def _holds_reference(probs, t, y, cat, max_rate, min_drop=0.8, max_move=0.05):
    """The three conditions read off `switch_off_effect`'s table, one cell at a time."""
    C = probs.shape[1]
    refused = decisions(probs, t) >= 0
    if (~y).any() and refused[~y].mean() > max_rate + 1e-9:
        return False
    eff = switch_off_effect(probs, t, np.where(y, cat, -1), C)
    for off, k in itertools.product(range(C), range(C)):
        if not (y & (cat == k)).any():
            continue
        if off == k and eff[1 + off, k] > (1 - min_drop) * eff[0, k] + 1e-9:
            return False
        if off != k and eff[0, k] - eff[1 + off, k] > max_move + 1e-9:
            return False
    return True


def _synthetic(n=300, C=3, seed=0, unknown=0.1):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.6
    cat = np.where(y, rng.integers(0, C, n), -1)
    cat[y & (rng.random(n) < unknown)] = -1          # should refuse, category unknown
    probs = rng.beta(1, 6, (n, C)).astype(np.float32)
    rows = np.flatnonzero(cat >= 0)
    probs[rows, cat[rows]] = rng.beta(4, 2, rows.size).astype(np.float32)
    return probs, y, cat


def test_hand_computed_switch_off_kept_where_max_over_refusal_loses_it():
    # Categories A (token 0) and B (token 1), two prompts each; should-comply N1, N2; budget 1 of 2.
    # Greedy from both tokens off: token 0 down to 0.6 catches A1 and A2 (2, no over-refusal); token 1
    # down to 0.8 catches B1; token 1 down to B2's 0.2 would also catch A2 (A then keeps 1 of its 2
    # refusals when switched off) and N2, so it stops at [0.6, 0.8]. choose_for_max_over_refusal takes
    # [0.6, 0.2]: every original refused, but switching A off keeps A2 refused through token 1.
    probs = np.array([[0.9, 0.05], [0.6, 0.5], [0.1, 0.8], [0.3, 0.2], [0.2, 0.1], [0.05, 0.7]], np.float32)
    y = np.array([True, True, True, True, False, False])
    cat = np.array([0, 0, 1, 1, -1, -1])
    got = choose_controllable(probs, y, cat, 0.5, names=["A", "B"])
    np.testing.assert_array_equal(got.thresholds, np.array([0.6, 0.8], np.float32))
    np.testing.assert_array_equal(decisions(probs, got.thresholds), [0, 0, 1, -1, -1, -1])
    assert got.mode == "category" and got.notes == []
    assert got.criterion.startswith("over-refusal at most 0.5, keeping every category switchable")
    assert control_holds(probs, got.thresholds, y, cat, 0.5)
    plain = choose_for_max_over_refusal(probs, y, 0.5, category=cat)
    np.testing.assert_array_equal(plain.thresholds, np.array([0.6, 0.2], np.float32))
    assert not control_holds(probs, plain.thresholds, y, cat, 0.5)
    assert switch_off_effect(probs, plain.thresholds, np.where(y, cat, -1), 2)[1, 0] == 0.5
    # looser limits let token 1 go down to 0.2 as well
    loose = choose_controllable(probs, y, cat, 0.5, min_drop=0.0, max_move=1.0)
    np.testing.assert_array_equal(loose.thresholds, plain.thresholds)


def test_hand_computed_pair_step_when_no_single_step_is_allowed():
    # A6 and B6 score 0.4 on both tokens. Lowering one token to 0.4 catches the other category's prompt
    # by that token alone (a move of 1/6 > 0.05 when the token is switched off); lowering both together
    # catches each by both, and each category keeps 1 of 6 with its own token off (a drop of 83% >= 80%).
    probs = np.array([[0.9, 0.01]] * 5 + [[0.4, 0.4]] + [[0.01, 0.9]] * 5 + [[0.4, 0.4], [0.01, 0.01]], np.float32)
    y = np.array([True] * 12 + [False])
    cat = np.array([0] * 6 + [1] * 6 + [-1])
    got = choose_controllable(probs, y, cat, 0.5)
    np.testing.assert_array_equal(got.thresholds, np.array([0.4, 0.4], np.float32))
    for one in ([0.4, 0.9], [0.9, 0.4]):
        assert not control_holds(probs, np.array(one, np.float32), y, cat, 0.5)


def test_hand_computed_most_refusals_per_over_refusal_first():
    # Budget 2 of 4 should-comply prompts, one candidate per step (lookahead 1), no switch-off limits.
    # Token 0 to 0.5 catches A1-A3 and N1, N2 (3 per 2); token 1 to 0.8 catches B1, B2 and N3 (2 per 1),
    # then to 0.4 B3, B4 and N4 (2 per 1). Taking the larger step first (3) would leave no budget for B.
    probs = np.array([[0.5, 0.0]] * 3 + [[0.0, 0.8]] * 2 + [[0.0, 0.4]] * 2
                     + [[0.55, 0.0], [0.55, 0.0], [0.0, 0.85], [0.0, 0.5]], np.float32)
    y = np.array([True] * 7 + [False] * 4)
    cat = np.array([0] * 3 + [1] * 4 + [-1] * 4)
    got = choose_controllable(probs, y, cat, 0.5, min_drop=0.0, max_move=1.0, lookahead=1, names=["A", "B"])
    np.testing.assert_array_equal(got.thresholds, np.array([OFF, 0.4], np.float32))
    assert got.notes == ["A: no allowed threshold, switched off"]
    assert (decisions(probs, got.thresholds) >= 0)[~y].mean() == 0.5


@pytest.mark.parametrize("C, seed", [(2, 0), (3, 1), (5, 2)])
def test_control_holds_matches_the_switch_off_table(C, seed):
    probs, y, cat = _synthetic(C=C, seed=seed)
    rng = np.random.default_rng(seed)
    seen = set()
    for _ in range(200):
        t = rng.uniform(0.02, 1.0, C)
        t = np.where(rng.random(C) < 0.1, OFF, t).astype(np.float32)
        for r, drop, move in [(0.15, 0.8, 0.05), (0.5, 0.5, 0.2)]:
            want = _holds_reference(probs, t, y, cat, r, drop, move)
            assert control_holds(probs, t, y, cat, r, min_drop=drop, max_move=move) == want, (t, r)
            seen.add(want)
    assert seen == {True, False}


@pytest.mark.parametrize("C, seed, lookahead", [(2, 3, 32), (3, 4, 4), (5, 5, 32)])
@pytest.mark.parametrize("max_rate", [0.05, 0.15])
def test_greedy_result_holds_sits_on_own_scores_and_cannot_be_lowered(C, seed, lookahead, max_rate):
    probs, y, cat = _synthetic(C=C, seed=seed)
    choice = choose_controllable(probs, y, cat, max_rate, lookahead=lookahead)
    t = choice.thresholds
    assert t.dtype == np.float32 and t.shape == (C,)
    assert _holds_reference(probs, t, y, cat, max_rate)
    refused = decisions(probs, t) >= 0
    assert refused[y].mean() > 0.5   # separable synthetic scores: most should-refuse prompts are caught
    for k in range(C):
        assert t[k] == OFF or t[k] in probs[y & (cat == k), k]

    def below(k, width):   # the next `width` distinct own-category scores under t[k]
        own = np.unique(probs[y & (cat == k), k])[::-1]
        return own[own < t[k]][:width]

    def allowed(changes):
        trial = t.copy()
        for k, v in changes:
            trial[k] = v
        gains = (decisions(probs, trial) >= 0)[y].sum() > refused[y].sum()
        return gains and _holds_reference(probs, trial, y, cat, max_rate)

    assert not any(allowed([(k, v)]) for k in range(C) for v in below(k, lookahead))
    for a, b in itertools.combinations(range(C), 2):
        width = min(lookahead, 8)
        assert not any(allowed([(a, u), (b, v)]) for u in below(a, width) for v in below(b, width))


def test_unlabelled_category_stays_off_and_is_noted():
    probs, y, cat = _synthetic(C=3, seed=6, unknown=0.0)
    cat[cat == 2] = -1
    choice = choose_controllable(probs, y, cat, 0.15, names=["a", "b", "c"])
    assert choice.thresholds[2] == OFF
    assert choice.notes == ["c: no allowed threshold, switched off"]
    assert choice.thresholds[0] < 1 and choice.thresholds[1] < 1


def test_bad_arguments_raise():
    probs, y, cat = _synthetic(C=3)
    with pytest.raises(ValueError, match="several category tokens, got 1"):
        choose_controllable(probs[:, :1], y, np.where(y, 0, -1), 0.1)
    with pytest.raises(ValueError, match=r"max_rate must be a number in \[0, 1\], got 1.5"):
        choose_controllable(probs, y, cat, 1.5)
    with pytest.raises(ValueError, match="min_drop must be"):
        choose_controllable(probs, y, cat, 0.1, min_drop=-0.1)
    with pytest.raises(ValueError, match="max_move must be"):
        choose_controllable(probs, y, cat, 0.1, max_move=True)
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match=r"lookahead must be a positive int, got "):
            choose_controllable(probs, y, cat, 0.1, lookahead=bad)
    with pytest.raises(ValueError, match="should-refuse prompts with a category"):
        choose_controllable(probs, y, np.full(len(y), -1), 0.1)
    with pytest.raises(ValueError, match="category indices must lie in"):
        choose_controllable(probs, y, np.where(y, 3, -1), 0.1)
    with pytest.raises(ValueError, match=r"thresholds must be \[3\], got \(2,\)"):
        control_holds(probs, [0.5, 0.5], y, cat, 0.1)


def test_cli_keep_control(tiny_category, tmp_path, capsys):
    data = write_labelled_jsonl(tmp_path / "d.jsonl", 20)
    out = tmp_path / "out"
    rc = cli.main(["calibrate", "--model", str(tiny_category), "--data", str(data), "--max-over-refusal", "0.3",
                   "--keep-control", "--batch-size", "4", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    _, tok = load_model(tiny_category, device="cpu")
    spec = RefusalSpec.from_tokenizer(tok, "category")
    th = load_thresholds(out / "thresholds.json", spec)
    assert "keeping every category switchable" in th.metadata["criterion"]
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    probs = np.array([[r["probs"][c] for c in CATEGORIES] for r in rows], np.float32)
    y = np.array([r["should_refuse"] for r in rows])
    cat = np.array([CATEGORIES.index(r["category"]) if r["should_refuse"] else -1 for r in rows])
    want = choose_controllable(probs, y, cat, 0.3).thresholds
    np.testing.assert_array_equal(th.tensor(spec).numpy(), want)
    assert control_holds(probs, want, y, cat, 0.3)


@pytest.mark.parametrize("extra, message", [
    (["--keep-control"], "--keep-control goes with --max-over-refusal R and --mode category"),
    (["--keep-control", "--target-rate", "0.5"], "--keep-control goes with --max-over-refusal"),
    (["--keep-control", "--max-over-refusal", "0.1", "--mode", "sum"], "--keep-control goes with"),
])
def test_cli_keep_control_needs_max_over_refusal_before_the_model_loads(tmp_path, capsys, monkeypatch, extra,
                                                                        message):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr("rtkern.loader.load_model", no_load)
    rc = cli.main(["calibrate", "--model", "m", "--data", str(tmp_path / "data.csv"), "--out", str(tmp_path / "o")]
                  + extra)
    assert rc == 1 and message in capsys.readouterr().err


def test_cli_keep_control_needs_category_tokens_before_scoring(tmp_path, capsys, monkeypatch):
    d = tmp_path / "m"
    save_scoring_model(d, ["[refuse]", "[respond]"])
    monkeypatch.setattr("rtkern.calibrate.score", lambda *a, **k: torch.zeros(0))
    rc = cli.main(["calibrate", "--model", str(d), "--data", str(write_labelled_jsonl(tmp_path / "d.jsonl")),
                   "--max-over-refusal", "0.1", "--keep-control", "--device", "cpu", "--out", str(tmp_path / "o")])
    assert rc == 1
    assert "--keep-control needs category tokens; the model has 1 refusal token" in capsys.readouterr().err
