"""rtkern.calibrate / rtkern.thresholds / rtkern.calibrate_data / ``rtkern calibrate``.

Metrics against hand-computed cases and brute force, threshold choice on synthetic scores, the
thresholds file, `score` against unbatched full forwards of a tiny random model, and the CLI end to end.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rtkern import cli
from rtkern.calibrate import (OFF, Choice, auroc, binary_metrics, choose_best_f1, choose_for_max_over_refusal,
                              choose_for_target_rate, decisions, last_position_logits, rate_curve,
                              rates_by_group, refusal_score, roc_curve, score, sweep, switch_off_effect,
                              threshold_for_best_f1, threshold_for_max_rate, threshold_for_rate)
from rtkern.calibrate_data import LabelledPrompts, coconot_is_test, even_subset, load_labelled
from rtkern.calibrate_report import Analysis, build_report
from rtkern.spec import CATEGORIES, RefusalSpec, control_token_strings
from rtkern.thresholds import FORMAT, load_thresholds, save_thresholds, thresholds_tensor
from tiny import save_scoring_model, write_labelled_jsonl

transformers = pytest.importorskip("transformers")

COCONOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "coconot"


# ---------------------------------------------------------------------------------------------------
# ROC / AUROC / F1 / rates
# ---------------------------------------------------------------------------------------------------

def test_auroc_and_roc_with_ties_hand_computed():
    y = [1, 1, 0, 0, 1, 0]
    s = [0.9, 0.5, 0.5, 0.1, 0.5, 0.3]
    # 9 pairs: 0.9 beats all 3 negatives; each positive 0.5 ties one negative (1/2) and beats two.
    assert auroc(y, s) == pytest.approx(8 / 9)
    fpr, tpr, thr = roc_curve(y, s)
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.5, 0.3, 0.1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 2 / 3, 1])
    assert np.trapezoid(tpr, fpr) == pytest.approx(8 / 9)
    assert auroc([1, 0, 1, 0], [0.2] * 4) == 0.5
    assert auroc([1, 1, 0], [0.9, 0.8, 0.1]) == 1.0 and auroc([1, 1, 0], [0.1, 0.2, 0.3]) == 0.0


def test_auroc_matches_pairwise_count_and_roc_area():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.4
    s = rng.integers(0, 7, 300).astype(float)  # heavy ties
    pos, neg = s[y], s[~y]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert auroc(y, s) == pytest.approx(pairs / (len(pos) * len(neg)), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(y, s), abs=1e-12)


def test_auroc_rejects_one_class_nan_and_bad_labels():
    with pytest.raises(ValueError, match="both classes"):
        auroc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auroc([1, 0], [0.1, float("nan")])
    with pytest.raises(ValueError, match="0/1"):
        auroc([2, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="same length"):
        roc_curve([1, 0], [0.1])


def test_binary_metrics_hand_computed():
    m = binary_metrics([1, 1, 1, 0, 0], [1, 0, 1, 1, 0])
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 1)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["fpr"] == 0.5 and m["accuracy"] == pytest.approx(3 / 5)
    empty = binary_metrics([1, 1], [0, 0])
    assert empty["f1"] == 0.0 and math.isnan(empty["precision"]) and math.isnan(empty["fpr"])


def test_rates_sweep_and_rate_curve_hand_computed():
    refused = [True, False, True, True, False]
    groups = [0, 0, 1, -1, 2]
    np.testing.assert_allclose(rates_by_group(refused, groups, 4), [0.5, 1.0, 0.0, np.nan])
    np.testing.assert_allclose(rate_curve([0.1, 0.5, 0.5, 0.9], [0.0, 0.5, 0.6, 1.0]), [1, 0.75, 0.25, 0])
    probs = np.array([[0.1, 0.6], [0.3, 0.2], [0.45, 0.45]], np.float32)
    np.testing.assert_allclose(refusal_score(probs, "category"), [0.6, 0.3, 0.45])
    np.testing.assert_allclose(refusal_score(probs, "sum"), [0.7, 0.5, 0.9], rtol=1e-6)
    # a float32 sum past 1 is capped as the sampler caps it: the threshold picked for it still refuses
    over = np.array([[0.5000001, 0.5000001], [0.2, 0.1]], np.float32)
    assert refusal_score(over, "sum")[0] == 1.0
    t = threshold_for_rate(refusal_score(over, "sum"), 0.5)
    assert (decisions(over, np.full(2, t, np.float32), "sum") >= 0).tolist() == [True, False]
    rates = sweep(probs, [0, 1, 1], 2, [0.4, 0.5], "category")
    np.testing.assert_allclose(rates, [[1, 0.5, 2 / 3], [1, 0, 1 / 3]])
    with pytest.raises(ValueError, match=r"groups must lie"):
        rates_by_group([True], [3], 2)


# ---------------------------------------------------------------------------------------------------
# Decisions (DESIGN.md rule 2) and switching categories off
# ---------------------------------------------------------------------------------------------------

def test_decisions_follow_rule_2():
    probs = np.array([[0.30, 0.30, 0.1],    # tie between passing categories -> lowest index
                      [0.20, 0.50, 0.40],   # largest passing p
                      [0.05, 0.05, 0.05],   # nothing passes
                      [0.35, 0.01, 0.01]], np.float32)
    np.testing.assert_array_equal(decisions(probs, 0.3), [0, 1, -1, 0])
    # category 1 off: row 1 now refused with category 2, the next largest passing
    np.testing.assert_array_equal(decisions(probs, [0.3, OFF, 0.3]), [0, 2, -1, 0])
    # sum mode: sum >= thresholds[0], category = argmax
    np.testing.assert_array_equal(decisions(probs, [0.75, 0.0, 0.0], "sum"), [-1, 1, -1, -1])
    with pytest.raises(ValueError, match="free"):
        decisions(probs, 0.3, "free")
    with pytest.raises(ValueError, match="NaN"):
        decisions(probs, [0.3, float("nan"), 0.3])


def test_decisions_and_choices_reject_bad_thresholds_and_categories():
    probs = np.array([[0.2, 0.7], [0.6, 0.1]], np.float32)
    for rows in (probs, probs[:0]):   # no prompts: checked all the same
        with pytest.raises(ValueError, match=">= 0"):
            decisions(rows, [0.3, -0.1])
    with pytest.raises(ValueError, match=r"category indices must lie in \[-1, 2\), got \[0, 2\]"):
        choose_best_f1(probs, [True, False], [2, 0])
    with pytest.raises(ValueError, match=r"category indices must lie"):
        choose_for_target_rate(probs, [True, False], [0, -2], 0.5)


def test_switch_off_drops_only_its_category():
    rng = np.random.default_rng(1)
    C, n = 3, 600
    cat = rng.integers(0, C, n)
    probs = rng.uniform(0, 0.2, (n, C)).astype(np.float32)
    probs[np.arange(n), cat] = rng.uniform(0.4, 1.0, n)   # each prompt's own token dominates
    eff = switch_off_effect(probs, [0.3] * C, cat, C)
    np.testing.assert_allclose(eff[0], 1.0)
    for k in range(C):
        assert eff[1 + k, k] == 0.0
        np.testing.assert_allclose(np.delete(eff[1 + k], k), 1.0)


def test_switch_off_effect_hand_computed_with_overlap():
    # Prompts that pass two categories fall to the other when one is switched off (what CoCoNot's terse
    # safety prompts do through "incomplete"); a group's prompt refused only through another category
    # drops when that one is switched off.
    probs = [[0.6, 0.1], [0.5, 0.4], [0.2, 0.1],      # group 0: via 0; via 0 (1 also passes); none
             [0.1, 0.35], [0.31, 0.32], [0.45, 0.2],  # group 1: via 1; via 1 (0 also passes); via 0 only
             [0.9, 0.9]]                              # no group
    eff = switch_off_effect(probs, [0.3, 0.3], [0, 0, 0, 1, 1, 1, -1], 2)
    np.testing.assert_allclose(eff, [[2 / 3, 1.0], [1 / 3, 2 / 3], [2 / 3, 2 / 3]])


# ---------------------------------------------------------------------------------------------------
# Threshold choice
# ---------------------------------------------------------------------------------------------------

def test_threshold_helpers_exact():
    s = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert threshold_for_rate(s, 0.4) == pytest.approx(0.4) and threshold_for_rate(s, 0.41) == pytest.approx(0.3)
    assert rate_curve(s, [threshold_for_rate(s, 0.0)])[0] == 0.0
    t = threshold_for_max_rate(s, 0.4)
    assert t > np.float32(0.3) and rate_curve(s, [t])[0] == 0.4
    assert threshold_for_max_rate(s, 1.0) == 0.0
    # F1 at >= 0.5, 0.4, 0.3, 0.2, 0.1: 2/4, 4/5, 4/6, 6/7, 6/8
    t, f1 = threshold_for_best_f1([0, 1, 0, 1, 1], s)
    assert t == pytest.approx(0.2) and f1 == pytest.approx(6 / 7)
    t, f1 = threshold_for_best_f1([0, 1, 0, 0, 1], s)   # 2/3 at both >= 0.5 and >= 0.2: the higher wins
    assert t == pytest.approx(0.5) and f1 == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        threshold_for_rate(s, 1.5)


def test_threshold_helpers_absorb_rounding_of_rate_times_n():
    s = np.arange(1, 26, dtype=np.float32)   # 0.28 * 25 = 7.000000000000001 in float64: still the 7th highest
    assert threshold_for_rate(s, 0.28) == 19.0 and rate_curve(s, [19.0])[0] == 0.28
    s = np.arange(100, dtype=np.float32)     # 0.29 * 100 = 28.999999999999996: still 29 may fire
    t = threshold_for_max_rate(s, 0.29)
    assert 70 < t < 71 and rate_curve(s, [t])[0] == 0.29


def _synthetic(n=2000, C=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.6
    cat = np.where(y, rng.integers(0, C, n), -1)
    probs = rng.beta(1, 6, (n, C)).astype(np.float32)
    own = rng.beta(4, 2, n).astype(np.float32)
    probs[y, cat[y]] = own[y]
    return probs, y, cat


@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("target", [0.5, 0.9])
def test_target_rate_is_hit(C, target):
    probs, y, cat = _synthetic(C=C)
    choice = choose_for_target_rate(probs, y, cat if C > 1 else None, target)
    refused = decisions(probs, choice.thresholds) >= 0
    if C == 1:
        assert target <= refused[y].mean() < target + 1 / y.sum()
        return
    own = [y & (cat == k) for k in range(C)]

    def thresholds_at(q):  # each token at its own category's rate-q threshold (q = 0: fires on none)
        return np.array([threshold_for_rate(probs[rows, k], q) if q else np.nextafter(probs[y, k].max(), 1)
                         for k, rows in enumerate(own)], np.float32)

    def reached(t):
        return all((decisions(probs, t) >= 0)[rows].mean() >= target for rows in own)

    # brute force over every share a category can realise: the smallest that reaches the target
    shares = sorted({j / rows.sum() for rows in own for j in range(rows.sum() + 1)})
    q = next(q for q in shares if reached(thresholds_at(q)))
    np.testing.assert_array_equal(choice.thresholds, thresholds_at(q))
    assert all(refused[rows].mean() >= target for rows in own)
    assert q < target  # other tokens' refusals count: each token alone fires on less than the target


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_target_rate_in_sum_mode_reads_the_summed_probability(target):
    probs, y, cat = _synthetic(C=3)
    choice = choose_for_target_rate(probs, y, cat, target, mode="sum")
    assert np.all(choice.thresholds == choice.thresholds[0])
    refused = decisions(probs, choice.thresholds, "sum") >= 0
    assert target <= refused[y].mean() < target + 1 / y.sum()
    best = choose_best_f1(probs, y, cat, mode="sum")
    f1 = binary_metrics(y, decisions(probs, best.thresholds, "sum") >= 0)["f1"]
    assert f1 == pytest.approx(max(binary_metrics(y, probs.sum(1) >= t)["f1"] for t in np.unique(probs.sum(1))))


def test_target_rate_counts_every_token():
    # token 0 also fires on category 1's prompt: choosing each token on its own category would refuse
    # both should-refuse prompts at target 0 (the bug this guards against)
    probs = np.array([[.10, .30], [.40, .20], [.35, .25]], np.float32)
    y, cat = np.array([True, True, False]), np.array([0, 1, -1])
    zero = choose_for_target_rate(probs, y, cat, 0.0)
    assert (decisions(probs, zero.thresholds) == -1).all()
    full = choose_for_target_rate(probs, y, cat, 1.0)
    assert (decisions(probs, full.thresholds)[y] >= 0).all()


@pytest.mark.parametrize("labels", ["none", "all -1"])
def test_target_rate_with_category_tokens_but_no_category_labels(labels):
    # data without a category column (or with categories the spec lacks): one shared threshold for
    # every token reaches the target, as with --max-over-refusal and --best-f1 (it used to IndexError)
    probs, y, _ = _synthetic(C=3)
    cat = {"none": None, "all -1": np.full(len(y), -1)}[labels]
    choice = choose_for_target_rate(probs, y, cat, 0.8)
    assert np.all(choice.thresholds == threshold_for_rate(probs[y].max(1), 0.8))
    assert 0.8 <= (decisions(probs, choice.thresholds) >= 0)[y].mean() < 0.8 + 1 / y.sum()
    assert len(choice.notes) == 3  # each token: no labelled prompts of its category


def test_target_rate_holds_for_should_refuse_prompts_of_no_labelled_category():
    # Both tokens labelled; 200 more should-refuse prompts have no category and lower scores. Holding
    # only the two categories to the target refused 82% of those.
    probs = np.full((500, 2), 0.01, np.float32)
    y, cat = np.arange(500) < 400, np.full(500, -1)
    cat[:100], cat[100:200] = 0, 1
    probs[:100, 0] = probs[100:200, 1] = np.linspace(0.1, 1.0, 100)
    probs[200:400, 0] = np.linspace(0.12, 0.5, 200)
    probs[400:, 0] = np.linspace(0.0, 0.05, 100)     # should comply
    choice = choose_for_target_rate(probs, y, cat, 0.9)
    refused = decisions(probs, choice.thresholds) >= 0
    assert refused[:200].mean() >= 0.9 and refused[200:400].mean() >= 0.9 and not refused[400:].any()
    assert refused[200:400].mean() < 0.91 and not [n for n in choice.notes if "no labelled category" in n]
    # out of reach (below every labelled prompt's score): the report's notes say so
    probs[200:400, 0] = 0.05
    choice = choose_for_target_rate(probs, y, cat, 0.9)
    assert any("no labelled category: refusal rate 0, below the target 0.9" in n for n in choice.notes)


def test_rates_may_be_numpy_scalars():
    probs, y, cat = _synthetic(C=3)
    for rate in (np.float32(0.5), np.float64(0.5), np.int64(1)):
        assert threshold_for_rate(probs[:, 0], rate) == threshold_for_rate(probs[:, 0], float(rate))
        np.testing.assert_array_equal(choose_for_target_rate(probs, y, cat, rate).thresholds,
                                      choose_for_target_rate(probs, y, cat, float(rate)).thresholds)
    for bad in (np.bool_(True), np.float32("nan"), np.float64(1.5)):
        with pytest.raises(ValueError, match=r"target must be a number in \[0, 1\]"):
            choose_for_target_rate(probs, y, cat, bad)


@pytest.mark.parametrize("mode", ["category", "sum"])
def test_max_over_refusal_is_respected_and_tight(mode):
    probs, y, _ = _synthetic()
    neg = probs[~y] if mode == "category" else probs[~y].sum(1, keepdims=True)
    for r in (0.05, 0.15):
        choice = choose_for_max_over_refusal(probs, y, r, mode)
        refused = decisions(probs, choice.thresholds, mode) >= 0
        # one more firing per token adds at most C refusals (1 in sum mode): the budget is used up to that
        assert r - neg.shape[1] / len(neg) < refused[~y].mean() <= r
        assert refused[y].mean() > 0.3
        # lowest: lowering every threshold to the next should-comply score below it goes over the budget
        t = choice.thresholds[:neg.shape[1]]
        lower = np.array([neg[neg[:, k] < t[k], k].max() for k in range(neg.shape[1])], np.float32)
        lowered = lower if mode == "category" else np.full(probs.shape[1], lower[0], np.float32)
        assert (decisions(probs, lowered, mode) >= 0)[~y].mean() > r


def test_max_over_refusal_hand_computed_budget_met_exactly():
    # should-comply rows 0-3; one firing per token (0.9 by token 0, 0.8 by token 1) over-refuses 2 of 4,
    # exactly the budget 0.5; two firings per token (down to 0.3) would over-refuse all 4
    probs = np.array([[0.9, 0.1], [0.1, 0.8], [0.3, 0.2], [0.2, 0.3], [0.95, 0.95]], np.float32)
    y = np.array([False, False, False, False, True])
    choice = choose_for_max_over_refusal(probs, y, 0.5)
    above = np.nextafter(np.float32(0.3), np.float32(1))
    np.testing.assert_array_equal(choice.thresholds, [above, above])
    np.testing.assert_array_equal(decisions(probs, choice.thresholds), [0, 1, -1, -1, 0])
    assert choice.notes == ["each category token may fire on at most 1 of 4 should-comply prompts"]
    assert choice.criterion == "over-refusal at most 0.5 on should-comply prompts"


def test_max_over_refusal_raises_each_token_to_its_own_category_hand_computed():
    # should-comply rows 0-3, budget 2 of 4. Without categories m = 1 gives t = [0.1+, 0.1+]: token 0 then
    # also refuses B (category 1) at 0.15, so switching category 1 off would not stop B's refusal.
    # With categories each token rises to its own lowest caught score: t0 = 0.9 (A), t1 = 0.7 (B), which
    # leaves room up to m = 2; m = 3 would let token 1 down to C's 0.05 and over-refuse 3 of 4.
    probs = np.array([[0.05, 0.1], [0.1, 0.05], [0.02, 0.3], [0.3, 0.02],
                      [0.9, 0.2], [0.15, 0.7], [0.12, 0.05]], np.float32)
    y = np.array([False] * 4 + [True] * 3)
    cat = np.array([-1] * 4 + [0, 1, 1])
    plain = choose_for_max_over_refusal(probs, y, 0.5)
    above = np.nextafter(np.float32(0.1), np.float32(1))
    np.testing.assert_array_equal(plain.thresholds, [above, above])
    np.testing.assert_array_equal(decisions(probs, plain.thresholds), [-1, -1, 1, 0, 0, 1, 0])
    assert (decisions(probs, [plain.thresholds[0], OFF]) == 0)[5]           # B refused with category 1 off
    tight = choose_for_max_over_refusal(probs, y, 0.5, category=cat)
    np.testing.assert_array_equal(tight.thresholds, np.array([0.9, 0.7], np.float32))
    np.testing.assert_array_equal(decisions(probs, tight.thresholds), [-1, -1, -1, -1, 0, 1, -1])
    assert (decisions(probs, [tight.thresholds[0], OFF]) == -1)[5]
    assert tight.notes[0] == "each category token may fire on at most 2 of 4 should-comply prompts"
    assert "own category" in tight.notes[1]
    # sum mode and unlabelled data keep the plain rule
    np.testing.assert_array_equal(choose_for_max_over_refusal(probs, y, 0.5, "sum", category=cat).thresholds,
                                  choose_for_max_over_refusal(probs, y, 0.5, "sum").thresholds)
    unl = choose_for_max_over_refusal(probs, y, 0.5, category=np.full(7, -1))
    np.testing.assert_array_equal(unl.thresholds, plain.thresholds)
    assert len(unl.notes) == 1


def test_max_over_refusal_with_categories_keeps_the_budget_on_synthetic_scores():
    probs, y, cat = _synthetic()
    for r in (0.05, 0.15):
        choice = choose_for_max_over_refusal(probs, y, r, category=cat)
        assert (decisions(probs, choice.thresholds) >= 0)[~y].mean() <= r
        for k, t in enumerate(choice.thresholds):   # every threshold is one of its own category's scores
            assert t in probs[y & (cat == k), k]
        np.testing.assert_array_equal(choice.thresholds, _tightened_brute_force(probs, y, cat, r))


def _tightened_brute_force(probs, y, cat, r):
    """Every budget m tried in turn: the rule of choose_for_max_over_refusal written the slow way."""
    neg = probs[~y]
    best = None
    for m in range(len(neg) + 1):
        t = []
        for k in range(probs.shape[1]):
            s = np.sort(neg[:, k])[::-1]
            tk = 0.0 if m >= len(s) else np.nextafter(s[m], np.float32(np.inf))
            caught = [v for v in probs[y & (cat == k), k] if v >= tk]
            t.append(min(caught) if caught else tk)
        t = np.array(t, np.float32)
        if (neg >= t).any(axis=1).mean() <= r:
            best = t
    return best


def test_best_f1_matches_brute_force():
    probs, y, cat = _synthetic(n=400, C=1)
    choice = choose_best_f1(probs, y, None)
    best = max(binary_metrics(y, probs[:, 0] >= t)["f1"] for t in np.unique(probs[:, 0]))
    assert binary_metrics(y, decisions(probs, choice.thresholds) >= 0)["f1"] == pytest.approx(best)
    probs, y, cat = _synthetic(n=400, C=3)
    choice = choose_best_f1(probs, y, cat)
    for k in range(3):
        rows = (y & (cat == k)) | ~y
        pos = (y & (cat == k))[rows]
        brute = max(binary_metrics(pos, probs[rows, k] >= t)["f1"] for t in np.unique(probs[rows, k]))
        got = binary_metrics(pos, probs[rows, k] >= choice.thresholds[k])["f1"]
        assert got == pytest.approx(brute)


def test_category_without_examples_keeps_shared_threshold():
    probs, y, cat = _synthetic(C=3)
    cat[cat == 2] = 0
    choice = choose_for_target_rate(probs, y, cat, 0.8, names=["a", "b", "c"])
    assert choice.notes == ["c: no labelled prompts of this category, kept the shared threshold "
                            f"{choice.thresholds[2]:.4g}"]
    assert choice.thresholds[2] == pytest.approx(threshold_for_rate(probs[y].max(1), 0.8))


# ---------------------------------------------------------------------------------------------------
# Report (hand-computed)
# ---------------------------------------------------------------------------------------------------

# Tokens a, b at 0.5. Refused: 0 (a), 1 (b: both pass, b larger), 3 (b), 5 (a, over-refusal).
REPORT_PROBS = np.array([[0.9, 0.1], [0.6, 0.7], [0.2, 0.1], [0.1, 0.8],                   # should refuse
                         [0.3, 0.2], [0.7, 0.1], [0.1, 0.2], [0.4, 0.45], [0.05, 0.05]], np.float32)
REPORT_Y = np.array([True] * 4 + [False] * 5)
REPORT_GROUP = np.array([0, 0, 0, 1, 0, 1, 1, 0, -1])


def _report(thresholds):
    a = Analysis(REPORT_PROBS, REPORT_Y, REPORT_GROUP, ["a", "b"], ("a", "b"),
                 Choice(np.array(thresholds, np.float32), "category", "hand"))
    return a, build_report(a, {"model": "m"}).splitlines()


def test_report_hand_computed():
    a, lines = _report([0.5, 0.5])
    m = a.headline()
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 4, 1) and m["auroc"] == pytest.approx(0.8)
    want = [
        "| a | 0.5 |", "| b | 0.5 |",
        # rates per set and category
        "| should refuse (original) | a | 3 | 66.7% |", "| should refuse (original) | b | 1 | 100.0% |",
        "| should refuse (original) | **all** | 4 | 75.0% |", "| should comply (contrast) | a | 2 | 0.0% |",
        "| should comply (contrast) | b | 2 | 50.0% |", "| should comply (contrast) | **all** | 5 | 20.0% |",
        # TPR 3/4, FPR 1/5, precision 3/4, F1 6/8, accuracy 7/9; AUROC 16/20 (max_c p_c, one tie at 0.7,
        # one at 0.2)
        "| 75.0% | 20.0% | 75.0% | 0.750 | 77.8% | 0.800 |",
        # AUROC per category: a 4/6, b 2/2
        "| **all** | 4 | 5 | 0.800 |", "| a | 3 | 2 | 0.667 |", "| b | 1 | 2 | 1.000 |",
        # sweep: refuse a, b, all, comply a, b, all
        "| 0.3 | 66.7% | 100.0% | 75.0% | 100.0% | 50.0% | 60.0% |",
        "| 0.5 | 66.7% | 100.0% | 75.0% | 0.0% | 50.0% | 20.0% |",
        # switch-off: rows 0-2 lose row 0 when a is off, row 3 is lost when b is off; row 5 needs a
        "| (none) | 66.7% | 100.0% | 20.0% |",
        "| a | 33.3% (-50%) | 100.0% (+0%) | 0.0% |",
        "| b | 66.7% (+0%) | 0.0% (-100%) | 20.0% |",
    ]
    for line in want:
        assert line in lines, line
    assert ("| threshold | refuse: a | refuse: b | refuse: all | comply: a | comply: b | comply: all |" in lines)
    # refused should-refuse prompts of a known category: 0 (a by a), 1 (a by b), 3 (b by b)
    assert any("66.7% were refused with their own category token" in line for line in lines)


def test_report_marks_only_thresholds_above_1_off():
    _, lines = _report([1.0, 2.0])
    assert "| a | 1 |" in lines and "| b | 2 (off) |" in lines


# ---------------------------------------------------------------------------------------------------
# Thresholds file
# ---------------------------------------------------------------------------------------------------

def _category_spec():
    return RefusalSpec([10, 11, 12, 13, 14], 15, CATEGORIES)


def test_thresholds_file_round_trip(tmp_path):
    spec = _category_spec()
    values = {n: v for n, v in zip(CATEGORIES, [0.25, 2.0, 0.5, 0.1, 0.3000000119])}
    path = save_thresholds(tmp_path / "t.json", values, metadata={"criterion": "best F1"}, spec=spec)
    th = load_thresholds(path, spec)
    assert th.thresholds == values and th.mode == "category" and th.metadata == {"criterion": "best F1"}
    assert th.created_by == "rtkern calibrate"
    t = thresholds_tensor(th, spec)
    assert t.dtype == torch.float32 and t.tolist() == torch.tensor(list(values.values())).tolist()
    from rtkern.spec import RefusalControls
    controls = RefusalControls.build(2, 5, thresholds=th.tensor(spec), mode=th.mode)
    assert controls.thresholds[1, 1] == 2.0
    # a default covers unnamed categories
    save_thresholds(tmp_path / "d.json", {"Humanizing requests": 0.7}, default=0.4, spec=spec)
    assert thresholds_tensor(load_thresholds(tmp_path / "d.json"), spec).tolist() == pytest.approx([0.7] + [0.4] * 4)


GOOD = {"format": FORMAT, "mode": "category", "thresholds": {"refuse": 0.5}}


@pytest.mark.parametrize("content, match", [
    ("{not json", "invalid JSON"),
    ('{"format": "rtkern-thresholds/1", "thresholds": {"refuse": NaN}}', r"thresholds\['refuse'\] must be finite"),
    ('{"format": "rtkern-thresholds/1", "thresholds": {"refuse": 0.5}, "default": Infinity}',
     "'default' must be finite"),
    (json.dumps({**GOOD, "format": "other/2"}), "'format'"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "format"}), "'format'"),
    (json.dumps({**GOOD, "mode": "free"}), "'mode'"),
    (json.dumps({**GOOD, "thresholds": {"refuse": -0.1}}), r"thresholds\['refuse'\] must be >= 0"),
    (json.dumps({**GOOD, "thresholds": {"refuse": "0.5"}}), r"thresholds\['refuse'\] must be a number"),
    (json.dumps({**GOOD, "thresholds": {"refuse": True}}), r"thresholds\['refuse'\] must be a number"),
    (json.dumps({**GOOD, "thresholds": {}}), "non-empty"),
    (json.dumps({**GOOD, "thresholds": [0.5]}), "non-empty object"),
    (json.dumps({**GOOD, "treshold": 1}), "unknown key 'treshold'"),
    (json.dumps({**GOOD, "mode": "sum", "thresholds": {"a": 0.5, "b": 0.6}}), "one threshold"),
    (json.dumps({**GOOD, "mode": "sum", "thresholds": {"refuse": 0.2}, "default": 0.3}),
     r"different values \[0\.2, 0\.3\] \('thresholds' holds \[0\.2\] and 'default' is 0\.3\)"),
    pytest.param(json.dumps({**GOOD, "thresholds": {"refuse": 10 ** 400}}),
                 r"thresholds\['refuse'\] must be finite .*integer of about 401 digits, too large for a float",
                 id="huge-int"),
    pytest.param(json.dumps({**GOOD, "thresholds": {"refuse": 0.5}, "default": -10 ** 400}),
                 "'default' must be finite", id="huge-negative-default"),
    ('{"format": "rtkern-thresholds/1", "thresholds": {"refuse": 0.2, "refuse": 0.9}}',
     r"key 'refuse' appears more than once in a JSON object \(values 0\.2 and 0\.9\)"),
    ('{"format": "rtkern-thresholds/1", "thresholds": {"refuse": 0.2}, "thresholds": {"refuse": 0.9}}',
     "key 'thresholds' appears more than once"),
    ('{"format": "rtkern-thresholds/1", "thresholds": {"refuse": 0.2}, "metadata": {"a": {"n": 1, "n": 2}}}',
     "key 'n' appears more than once"),
    (json.dumps([GOOD]), "JSON object"),
    (json.dumps({**GOOD, "metadata": [1]}), "'metadata' must be an object"),
    (json.dumps({**GOOD, "created_by": 3}), "'created_by' must be a string"),
])
def test_thresholds_file_rejects_bad_files(tmp_path, content, match):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        load_thresholds(f)
    assert "bad.json" in str(e.value)


def test_thresholds_file_checks_categories_against_spec(tmp_path):
    spec = _category_spec()
    f = tmp_path / "t.json"
    f.write_text(json.dumps({**GOOD, "thresholds": {"Humanizing requests": 0.5, "Violence": 0.3}}))
    with pytest.raises(ValueError, match=r"t\.json: thresholds\['Violence'\] is not a category"):
        load_thresholds(f, spec)
    f.write_text(json.dumps({**GOOD, "thresholds": {"Humanizing requests": 0.5}}))
    with pytest.raises(ValueError, match=r"no threshold for category 'Incomplete requests'"):
        load_thresholds(f, spec)
    load_thresholds(f)  # without a spec the names are not checked
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_thresholds(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="must be >= 0"):
        save_thresholds(tmp_path / "x.json", {"refuse": -1})
    assert not (tmp_path / "x.json").exists()


def test_thresholds_file_defaults_and_spec_order(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"format": FORMAT, "thresholds": {"b": 0.25, "a": 0.75}}))
    th = load_thresholds(f)
    assert th.mode == "category" and th.default is None and th.created_by is None and th.metadata == {}
    # the tensor follows the spec's order, not the file's or the alphabet's
    assert thresholds_tensor(th, RefusalSpec([10, 11], None, ["b", "a"])).tolist() == [0.25, 0.75]


def test_save_thresholds_takes_numpy_numbers_not_bools(tmp_path):
    path = save_thresholds(tmp_path / "t.json", {"a": np.float32(0.25), "b": np.int64(2), "c": np.float16(0.5)},
                           default=np.float32(0.75))
    want = {"a": 0.25, "b": 2.0, "c": 0.5}
    assert json.loads(path.read_text())["thresholds"] == want and json.loads(path.read_text())["default"] == 0.75
    th = load_thresholds(path)
    assert th.thresholds == want and all(type(v) is float for v in th.thresholds.values())
    for bad in (True, np.bool_(True)):
        with pytest.raises(ValueError, match=r"thresholds\['a'\] must be a number"):
            save_thresholds(tmp_path / "b.json", {"a": bad})
    with pytest.raises(ValueError, match="too large for a float"):
        save_thresholds(tmp_path / "b.json", {"a": 10 ** 400})
    assert not (tmp_path / "b.json").exists()
    # sum mode: one threshold as the sampler holds it (float32), whether written as a double or a float32
    th = load_thresholds(save_thresholds(tmp_path / "s.json", {"a": np.float32(0.3), "b": 0.3}, mode="sum"))
    assert th.mode == "sum"
    with pytest.raises(ValueError, match="one threshold"):  # 1.0 refuses at p = 1, just above 1 never does
        save_thresholds(tmp_path / "s.json", {"a": 1.0, "b": 1 + 1e-9}, mode="sum")


# ---------------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------------

def test_csv_and_jsonl_loading(tmp_path):
    c = tmp_path / "d.csv"
    c.write_text('prompt,label,category\n"multi\nline",refuse,unknowns\nhi,0,\n\nwhy,COMPLY,Other\n')
    d = load_labelled(c)
    assert d.prompts == ["multi\nline", "hi", "why"] and d.should_refuse.tolist() == [True, False, False]
    assert d.categories == ["Indeterminate requests", None, "Other"]
    assert d.sources == [f"{c}:2", f"{c}:4", f"{c}:6"]
    j = tmp_path / "d.jsonl"
    j.write_text('{"prompt": "a", "label": 1, "category": "Humanizing requests"}\n\n'
                 '{"prompt": "b", "label": "refuse"}\n')
    d = load_labelled(j)
    assert d.should_refuse.tolist() == [True, True] and d.sources[1] == f"{j}:3"


@pytest.mark.parametrize("name, content, match", [
    ("a.jsonl", '{"prompt": "a", "label": 1}\n{"prompt": "b"}\n', r"a\.jsonl:2: missing field 'label'"),
    ("a.jsonl", '{"prompt": "a", "label": 1}\nnot json\n', r"a\.jsonl:2: invalid JSON"),
    ("a.jsonl", '{"prompt": "a", "label": "maybe"}\n', r"a\.jsonl:1: 'label' must be refuse/comply"),
    ("a.jsonl", '{"prompt": "", "label": 1}\n', r"a\.jsonl:1: 'prompt' must be a non-empty string"),
    ("a.jsonl", '[1, 2]\n', r"a\.jsonl:1: expected a JSON object"),
    ("a.csv", "prompt,label\nx,1\ny,1,extra\n", r"a\.csv:3: expected 2 fields"),
    ("a.csv", "text,label\nx,1\n", r"a\.csv:1: header has no column 'prompt'"),
    ("a.csv", "prompt,label\nx,2\n", r"a\.csv:2: 'label'"),
    ("a.txt", "x", "unsupported data file type"),
])
def test_malformed_data_names_file_and_line(tmp_path, name, content, match):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_labelled(f)


@pytest.mark.parametrize("name, content, offset, line", [
    ("a.csv", b"prompt,label\nx,1\ncaf\xe9,0\n", 20, 3),
    ("a.jsonl", b'{"prompt": "x", "label": 1}\n' * 500 + b'{"prompt": "caf\xe9", "label": 0}\n', 14015, 501),
], ids=["csv", "jsonl"])
def test_data_not_utf8_names_file_and_byte_offset(tmp_path, name, content, offset, line):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name}: not UTF-8 text \(byte 0xe9 at byte offset {offset}, line {line}:"):
        load_labelled(f)


def test_data_bom_accepted_and_repeated_csv_column_rejected(tmp_path):
    for name, text in (("b.csv", "prompt,label\nx,1\n"), ("b.jsonl", '{"prompt": "x", "label": 1}\n')):
        f = tmp_path / name
        f.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert load_labelled(f).prompts == ["x"]
    f = tmp_path / "d.csv"
    f.write_text("prompt,label,prompt\nx,1,y\n")
    with pytest.raises(ValueError, match=r"d\.csv:1: header repeats column 'prompt'"):
        load_labelled(f)


def test_label_spellings_category_names_and_empty_files(tmp_path):
    c = tmp_path / "l.csv"
    labels = ["refuse", "Refusal", "1", "TRUE", "yes", "comply", "compliance", "respond", "0", "false", "no"]
    cats = ["humanizing REQUESTS", " Unknowns ", "", "Other", "x", "", "", "", "", "", ""]
    c.write_text("prompt,label,category\n" + "".join(f"p{i},{lab},{cat}\n" for i, (lab, cat) in
                                                     enumerate(zip(labels, cats))))
    d = load_labelled(c)
    assert d.should_refuse.tolist() == [True] * 5 + [False] * 6
    assert d.categories[:5] == ["Humanizing requests", "Indeterminate requests", None, "Other", "x"]
    j = tmp_path / "l.jsonl"
    j.write_text("".join(json.dumps({"prompt": "p", "label": v}) + "\n" for v in (1.0, 0.0, True, False, 1, 0)))
    assert load_labelled(j).should_refuse.tolist() == [True, False, True, False, True, False]
    j.write_text(json.dumps({"prompt": "p", "label": 1, "category": 3}) + "\n")
    with pytest.raises(ValueError, match=r"l\.jsonl:1: 'category' must be a string, got 3"):
        load_labelled(j)
    for name, text in (("e.csv", "prompt,label\n\n"), ("e.jsonl", "\n\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{name}: no prompts"):
            load_labelled(tmp_path / name)


def test_category_names_and_index():
    d = LabelledPrompts(["p"] * 5, np.ones(5, bool), ["x", None, "y", "x", "z"], [""] * 5)
    assert d.category_names(["z", "w"]) == ["z", "w", "x", "y"]
    np.testing.assert_array_equal(d.category_index(["z", "w", "x", "y"]), [2, -1, 3, 2, 0])


def test_coconot_folder_split_on_a_synthetic_folder(tmp_path):
    # sha256("61r5fgv")[:8] = 88db396d -> % 10 = 1 (test); "bajp42a" -> df884433 -> % 10 = 3 (train, the edge)
    orig, contrast = tmp_path / "coconot_eval.jsonl", tmp_path / "coconot_contrast_eval.jsonl"
    orig.write_text(json.dumps({"id": "bajp42a", "prompt": "o1", "category": "Humanizing requests"}) + "\n"
                    + json.dumps({"id": "61r5fgv", "prompt": "o2", "category": "unknowns"}) + "\n")
    contrast.write_text(json.dumps({"id": "bajp42a", "prompt": "c1", "category": "Incomplete requests"}) + "\n")
    d = load_labelled(tmp_path)
    assert d.prompts == ["o2", "c1"] and d.should_refuse.tolist() == [True, False]
    assert d.categories == ["Indeterminate requests", "Incomplete requests"]
    assert d.sources == [f"{orig}:2", f"{contrast}:1"]
    contrast.write_text(json.dumps({"id": "bajp42a", "prompt": "c1"}) + "\n")
    with pytest.raises(ValueError, match=r"coconot_contrast_eval\.jsonl:1: field 'category' must be a string"):
        load_labelled(tmp_path)
    contrast.unlink()
    with pytest.raises(FileNotFoundError, match="missing coconot_contrast_eval.jsonl"):
        load_labelled(tmp_path)


def test_even_subset_keeps_both_labels_and_spreads():
    d = LabelledPrompts([str(i) for i in range(20)], np.array([True] * 15 + [False] * 5),
                        [f"c{i // 5}" for i in range(20)], [""] * 20)
    s = even_subset(d, 3)
    assert s.prompts == ["0", "7", "14", "15", "17", "19"]


def test_even_subset_rounds_to_nearest_and_rejects_bad_limits():
    d = LabelledPrompts([str(i) for i in range(6)], np.ones(6, bool), [None] * 6, [""] * 6)
    assert even_subset(d, 4).prompts == ["0", "2", "3", "5"]   # linspace(0, 5, 4) = 0, 1.67, 3.33, 5
    assert even_subset(d, 9).prompts == d.prompts
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="limit must be a positive int"):
            even_subset(d, bad)


@pytest.mark.skipif(not COCONOT.is_dir(), reason="shared CoCoNot data not present")
def test_coconot_folder_split():
    d = load_labelled(COCONOT)
    assert int(d.should_refuse.sum()) == 284 and int((~d.should_refuse).sum()) == 379
    refuse_cats = [c for c, y in zip(d.categories, d.should_refuse) if y]
    assert refuse_cats.count("Indeterminate requests") == 37 and refuse_cats.count("Humanizing requests") == 27
    assert set(d.categories) <= set(CATEGORIES)
    # sha256("bajp42a")[:8] = df884433 -> % 10 = 3 (train); "61r5fgv" -> 88db396d -> 1 (test)
    assert not coconot_is_test("bajp42a") and coconot_is_test("61r5fgv")


# ---------------------------------------------------------------------------------------------------
# Scoring on a tiny random model
# ---------------------------------------------------------------------------------------------------

PROMPTS = ["hello", "please refuse this request and respond to the user kindly, hello world " * 3,
           "world", "respond kindly", [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}],
           "the user spells [refuse] and [respond] in text", "x" * 40, "please"]


def _unbatched(model, tok, prompts, spec):
    rows = []
    for p in prompts:
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
        ids = torch.tensor([tok.apply_chat_template(msgs, add_generation_prompt=True)])
        with torch.no_grad():
            logits = model(ids)[0, -1].double()
        rows.append(torch.softmax(logits, -1)[list(spec.control_ids)].float())
    return torch.stack(rows)


def test_score_equals_unbatched_full_forward(tiny_category):
    from rtkern.loader import load_model
    model, tok = load_model(tiny_category, device="cpu")
    spec = RefusalSpec.from_tokenizer(tok, "category", require_respond=True)
    tok.protect(spec.control_ids)
    assert set(spec.control_ids).isdisjoint(tok.apply_chat_template([{"role": "user", "content": PROMPTS[5]}]))
    ref = _unbatched(model, tok, PROMPTS, spec)
    for bs in (1, 3, 8):
        got = score(model, tok, PROMPTS, spec, batch_size=bs, progress=False)
        assert got.shape == (len(PROMPTS), 6) and got.dtype == torch.float32
        # relative only: the respond column is ~1e-9, below any useful atol (observed rel. error 5e-6)
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=3e-5)
    assert ref[:, :5].std() > 1e-3  # the probabilities differ between prompts: the test can fail


def test_score_uses_last_positions_only_and_generic_fallback(tiny_category):
    from rtkern.loader import load_model
    model, tok = load_model(tiny_category, device="cpu")
    spec = RefusalSpec.from_tokenizer(tok, "category")
    tokens = torch.randint(0, 300, (3, 9))
    last = torch.tensor([8, 2, 5])
    with torch.no_grad():
        full = model(tokens)[torch.arange(3), last]
        seen = []
        hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
        try:
            torch.testing.assert_close(last_position_logits(model, tokens, last), full, atol=1e-5, rtol=0)
        finally:
            hook.remove()
        assert seen == [(3, 64)]  # the head ran on the three read positions only, never [B, T, V]

    class Wrapped(torch.nn.Module):  # not a Transformer: falls back to the full forward
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)

    a = score(model, tok, PROMPTS[:4], spec, batch_size=2, progress=False)
    b = score(Wrapped(model), tok, PROMPTS[:4], spec, batch_size=4, progress=False)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=3e-5)
    with pytest.raises(ValueError, match="prompt 1 is .* tokens"):
        score(model, tok, PROMPTS[:2], spec, max_length=20, progress=False)
    with pytest.raises(TypeError, match="prompt 0"):
        score(model, tok, [3], spec, progress=False)
    assert score(model, tok, [], spec, progress=False).shape == (0, 6)
    model.setup_cache(2, 64)
    try:
        with pytest.raises(ValueError, match="remove_cache"):
            score(model, tok, PROMPTS[:1], spec, progress=False)
    finally:
        model.remove_cache()


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

def test_cli_end_to_end(tiny_category, tmp_path, capsys):
    data = write_labelled_jsonl(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    rc = cli.main(["calibrate", "--model", str(tiny_category), "--data", str(data), "--target-rate", "0.5",
                   "--batch-size", "4", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    from rtkern.loader import load_model
    model, tok = load_model(tiny_category, device="cpu")
    spec = RefusalSpec.from_tokenizer(tok, "category")
    th = load_thresholds(out / "thresholds.json", spec)
    assert th.mode == "category" and set(th.thresholds) == set(CATEGORIES)
    assert th.metadata["criterion"].startswith("target refusal rate 0.5")
    report = (out / "report.md").read_text()
    for section in ("Chosen thresholds", "Refusal rates at the chosen thresholds", "AUROC",
                    "Refusal rate vs one threshold", "Switching one category off", "| Humanizing requests |"):
        assert section in report, section
    for png in ("refusal_rate.png", "roc.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and set(rows[0]["probs"]) == set(CATEGORIES) and 0 < rows[0]["respond"] < 1
    # every column is the named token's probability (respond last)
    want = score(model, tok, [r["prompt"] for r in rows], spec, batch_size=4, progress=False)
    got = torch.tensor([[r["probs"][c] for c in spec.names] + [r["respond"]] for r in rows], dtype=torch.float32)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=3e-5)
    # every category's realised refusal rate (any token firing) reaches the target
    probs = np.array([[r["probs"][c] for c in CATEGORIES] for r in rows])
    refused = decisions(probs, th.tensor(spec).numpy()) >= 0
    for c in CATEGORIES:
        own = [i for i, r in enumerate(rows) if r["should_refuse"] and r["category"] == c]
        assert own, f"the data gives {c} no should-refuse prompt"
        assert refused[own].mean() >= 0.5
    assert "wrote" in capsys.readouterr().out
    # --max-over-refusal in category mode raises each token to its own category (the labels reach it)
    rc = cli.main(["calibrate", "--model", str(tiny_category), "--data", str(data), "--max-over-refusal", "0.5",
                   "--batch-size", "4", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "mor")])
    assert rc == 0, capsys.readouterr().err
    y = np.array([r["should_refuse"] for r in rows])
    cat = np.array([CATEGORIES.index(r["category"]) if r["should_refuse"] else -1 for r in rows])
    want = choose_for_max_over_refusal(probs.astype(np.float32), y, 0.5, category=cat).thresholds
    got = load_thresholds(tmp_path / "mor" / "thresholds.json", spec).tensor(spec).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_cli_single_scheme_sum_mode_and_limit(tmp_path, capsys):
    d = tmp_path / "m"
    # Both schemes' tokens in the vocabulary; the trainer's rtkern.json says which one the model uses.
    save_scoring_model(d, ["[refuse]", "[respond]"] + control_token_strings("category")[0], seed=1)
    (d / "rtkern.json").write_text(json.dumps({"scheme": "single", "refusal_tokens": ["[refuse]"],
                                               "respond_token": "[respond]"}))
    data = write_labelled_jsonl(tmp_path / "d.jsonl", 16)
    out = tmp_path / "out"
    rc = cli.main(["calibrate", "--model", str(d), "--data", str(data), "--max-over-refusal", "0.25", "--mode", "sum",
                   "--limit", "5", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    th = load_thresholds(out / "thresholds.json")
    assert th.mode == "sum" and list(th.thresholds) == ["refuse"]
    assert th.metadata["prompts"] == 10 and th.metadata["at_thresholds"]["fpr"] <= 0.25
    assert th.metadata["criterion"] == "over-refusal at most 0.25 on should-comply prompts"
    assert "Not applicable in `sum` mode" in (out / "report.md").read_text()


def test_cli_errors(tmp_path, capsys):
    base = tmp_path / "base"
    save_scoring_model(base, [])
    data = write_labelled_jsonl(tmp_path / "d.jsonl")
    args = ["calibrate", "--model", str(base), "--data", str(data), "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "o")]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "no refusal control tokens" in err and "--refusal-tokens" in err
    # explicit ids make a base model usable (scores of ordinary tokens)
    assert cli.main(args + ["--refusal-tokens", "5,6", "--respond-token", "7"]) == 0
    assert set(load_thresholds(tmp_path / "o" / "thresholds.json").thresholds) == {"category_0", "category_1"}
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "label": 1}\n{"prompt": "b", "label": "perhaps"}\n')
    assert cli.main(["calibrate", "--model", str(base), "--data", str(bad), "--out", str(tmp_path / "o2")]) == 1
    assert f"{bad}:2" in capsys.readouterr().err
    assert cli.main(args[:-2] + ["--target-rate", "1.5", "--out", str(tmp_path / "o3")]) == 1
    assert r"--target-rate must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "o3" / "thresholds.json").exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["calibrate", "--model", "x", "--data", "y", "--out", "z", "--best-f1", "--target-rate", "0.5"])
    assert e.value.code == 2
    assert "argument --target-rate: not allowed with argument --best-f1" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--batch-size", "0", "--batch-size must be a positive integer, got 0"),
    ("--max-length", "0", "--max-length must be a positive integer, got 0"),
    ("--limit", "-2", "--limit must be a positive integer, got -2"),
    ("--target-rate", "-0.5", r"--target-rate must be in [0, 1], got -0.5"),
    ("--max-over-refusal", "1.01", r"--max-over-refusal must be in [0, 1], got 1.01"),
])
def test_cli_bad_numbers_fail_before_the_model_loads(tmp_path, capsys, monkeypatch, option, value, message):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr("rtkern.loader.load_model", no_load)
    rc = cli.main(["calibrate", "--model", "m", "--data", str(tmp_path / "data.csv"), option, value,
                   "--out", str(tmp_path / "o")])
    assert rc == 1 and f"rtkern calibrate: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_token_lookup_and_respond_none():
    from rtkern.calibrate_cli import _explicit_spec, _lookup, _respond_id

    class Tok:
        vocab = {"a": 0, "[refuse]": 1, "\u0120hello\u0120world": 2, " x": 3, "[respond]": 4}

        def __len__(self):
            return len(self.vocab)

        def get_vocab(self):
            return dict(self.vocab)

    tok = Tok()
    assert [_lookup(tok, s, tok.vocab) for s in ("4", " 0", "[refuse]", "hello world", "x")] == [4, 0, 1, 2, 3]
    for bad in ("5", "-1"):
        with pytest.raises(ValueError, match=f"token id {bad} is out of range for a vocabulary of 5"):
            _lookup(tok, bad, tok.vocab)
    with pytest.raises(ValueError, match="'y' is not in the vocabulary"):
        _lookup(tok, "y", tok.vocab)
    assert _respond_id(tok, None) is None and _respond_id(tok, " None ") is None and _respond_id(tok, "4") == 4
    spec = _explicit_spec(tok, "[refuse], 3", None)
    assert spec.refusal_ids == (1, 3) and spec.respond_id == 4
    assert _explicit_spec(tok, "1", "none").respond_id is None


def test_cli_unusable_out_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.write_text("a file where the report folder should go")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")
    monkeypatch.setattr("rtkern.loader.load_model", no_load)
    rc = cli.main(["calibrate", "--model", "m", "--data", str(tmp_path / "data.csv"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and f"rtkern calibrate: error: --out {out}: cannot write the report there" in err
