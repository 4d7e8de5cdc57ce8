"""Calibration: score prompts once, then sweep refusal thresholds offline.

`score` (from `rtkern.scoring`) runs one batched prefill per chunk of prompts and returns the
first-token probability of every control token. Everything else here is plain numpy on those scores:
the rule-2 decisions of the sampler, refusal rates per category against threshold sweeps, ROC/AUROC,
precision/recall/F1, and the choice of per-category thresholds (target refusal rate, maximum
over-refusal, best F1; the search in `rtkern.calibrate_control` also keeps every category switchable).

Conventions for the metric functions: ``probs`` is float32 ``[N, C]`` (refusal tokens only, spec
order); ``should_refuse`` is bool ``[N]``; ``category`` is int ``[N]``, the index of each prompt's
category in the spec's names (token c <-> category c), -1 when unknown. Thresholds are float32 ``[C]``;
a value above 1 switches a category off.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from .reference import decide
from .scoring import Prompt, Scorer, last_position_logits, score  # noqa: F401  (re-exported)
from .spec import RefusalControls

OFF = 2.0  # any threshold above 1 switches a category off; 2.0 is exact in float32 and JSON

# ---------------------------------------------------------------------------------------------------
# Decisions and rates
# ---------------------------------------------------------------------------------------------------

def _probs(probs) -> np.ndarray:
    a = np.asarray(probs.detach().cpu() if isinstance(probs, torch.Tensor) else probs)
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"probs must be [N, C] with C >= 1, got shape {list(a.shape)}")
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"probs must be floating point, got {a.dtype}")
    return a.astype(np.float32, copy=False)


def _thresholds(thresholds, num_categories: int) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float32)
    if t.ndim == 0:
        t = np.full(num_categories, t, dtype=np.float32)
    if t.shape != (num_categories,):
        raise ValueError(f"thresholds must be a scalar or [{num_categories}], got shape {list(t.shape)}")
    if np.isnan(t).any() or (t < 0).any():
        raise ValueError(f"thresholds must be >= 0 and not NaN, got {t.tolist()}")
    return t


def _check_mode(mode: str) -> None:
    if mode not in ("category", "sum"):
        raise ValueError(f"mode must be 'category' or 'sum' (thresholds do not apply to 'free'), got {mode!r}")


def decisions(probs, thresholds, mode: str = "category") -> np.ndarray:
    """Refusal decision of each prompt under rule 2 of README "Semantics" (the sampler's own `decide`).

    Parameters
    ----------
    probs : float ``[N, C]``
    thresholds : float, scalar or ``[C]``
        ``category`` mode compares each p_c with thresholds[c]; ``sum`` mode compares sum_c p_c with
        thresholds[0].
    mode : {"category", "sum"}

    Returns
    -------
    np.ndarray
        int64 ``[N]``: the refusal category, or -1 when the prompt is answered.
    """
    p = _probs(probs)
    _check_mode(mode)
    t = _thresholds(thresholds, p.shape[1])
    if p.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    controls = RefusalControls.build(p.shape[0], p.shape[1], "cpu", thresholds=torch.from_numpy(t), mode=mode)
    refuse, best, _ = decide(torch.from_numpy(np.ascontiguousarray(p)), controls, has_respond=False)
    return torch.where(refuse, best, -1).numpy().astype(np.int64)


def refusal_score(probs, mode: str = "category") -> np.ndarray:
    """The scalar that a single threshold t shared by all categories compares with.

    ``category`` mode refuses iff max_c p_c >= t; ``sum`` mode iff min(sum_c p_c, 1) >= t (rounding can
    take the sum past 1). Returns float32 [N].
    """
    p = _probs(probs)
    _check_mode(mode)
    if mode == "category":
        return p.max(axis=1)
    # torch's float32 sum capped at 1, as in the reference `decide`, so a threshold picked here decides the same.
    return torch.from_numpy(np.ascontiguousarray(p)).sum(1).clamp(max=1.0).numpy()


def rates_by_group(refused, groups, num_groups: int) -> np.ndarray:
    """Fraction refused within each group.

    Parameters
    ----------
    refused : bool ``[N]``
    groups : int ``[N]``, values in [-1, num_groups); -1 counts only towards no group
    num_groups : int

    Returns
    -------
    np.ndarray
        float64 ``[num_groups]``; NaN for an empty group.
    """
    r = np.asarray(refused, dtype=bool)
    g = np.asarray(groups, dtype=np.int64)
    if r.shape != g.shape or r.ndim != 1:
        raise ValueError(f"refused and groups must be [N] of the same length, got {r.shape} and {g.shape}")
    if g.size and (g.min() < -1 or g.max() >= num_groups):
        raise ValueError(f"groups must lie in [-1, {num_groups}), got [{g.min()}, {g.max()}]")
    keep = g >= 0
    count = np.bincount(g[keep], minlength=num_groups).astype(np.float64)
    hits = np.bincount(g[keep], weights=r[keep].astype(np.float64), minlength=num_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, hits / np.maximum(count, 1), np.nan)


def rate_curve(scores, grid) -> np.ndarray:
    """Fraction of ``scores`` (float ``[N]``) at or above each threshold of ``grid`` (``[K]``); float64 [K].

    NaN when N is 0.
    """
    s = np.sort(np.asarray(scores, dtype=np.float32))
    g = np.asarray(grid, dtype=np.float32)
    if s.size == 0:
        return np.full(g.shape, np.nan)
    return (s.size - np.searchsorted(s, g, side="left")) / s.size


def sweep(probs, groups, num_groups: int, grid, mode: str = "category") -> np.ndarray:
    """Refusal rate per group against one threshold shared by every category.

    Parameters
    ----------
    probs : float ``[N, C]``
    groups : int ``[N]`` (-1: no group)
    num_groups : int
    grid : float ``[K]`` thresholds
    mode : {"category", "sum"}

    Returns
    -------
    np.ndarray
        float64 ``[K, num_groups + 1]``: one column per group, then all N prompts; NaN for an empty group.
    """
    s = refusal_score(probs, mode)
    g = np.asarray(groups, dtype=np.int64)
    if g.shape != s.shape:
        raise ValueError(f"groups must be [{s.shape[0]}], got shape {list(g.shape)}")
    cols = [rate_curve(s[g == k], grid) for k in range(num_groups)] + [rate_curve(s, grid)]
    return np.stack(cols, axis=1)


# ---------------------------------------------------------------------------------------------------
# ROC / AUROC / F1
# ---------------------------------------------------------------------------------------------------

def _binary(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("y_true must be boolean or 0/1")
        y = y.astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"y_true and scores must be [N] of the same length, got {y.shape} and {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if y.all() or not y.any():
        raise ValueError(f"ROC needs both classes, got {int(y.sum())} positives of {y.size}")
    return y, s


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of "refuse iff score >= t" over every distinct score.

    Parameters
    ----------
    y_true : bool ``[N]`` (True = should refuse), both classes present
    scores : float ``[N]``

    Returns
    -------
    fpr, tpr, thresholds : float64 ``[K + 1]``
        Starting at (0, 0) with threshold +inf, then one point per distinct score, descending. Tied
        scores move FPR and TPR together, so the trapezoidal area equals `auroc`.
    """
    y, s = _binary(y_true, scores)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.diff(s) != 0, True]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    tpr = np.r_[0.0, tp / y.sum()]
    fpr = np.r_[0.0, fp / (~y).sum()]
    return fpr, tpr, np.r_[np.inf, s[last_of_tie]]


def auroc(y_true, scores) -> float:
    """Area under the ROC curve: the Mann-Whitney U statistic over n_pos * n_neg, ties counted 1/2.

    Parameters
    ----------
    y_true : bool ``[N]``, both classes present
    scores : float ``[N]``

    Returns
    -------
    float
        P(score of a random positive > that of a random negative) + 0.5 P(equal).
    """
    y, s = _binary(y_true, scores)
    ranks = _midranks(s)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _midranks(x: np.ndarray) -> np.ndarray:
    # 1-based ranks, tied values sharing the mean of the ranks they span.
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(xs) != 0) + 1]
    ends = np.r_[starts[1:], xs.size]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def binary_metrics(y_true, y_pred) -> dict[str, float]:
    """Confusion counts and rates of refusal decisions against labels.

    Parameters
    ----------
    y_true : bool ``[N]`` (True = should refuse)
    y_pred : bool ``[N]`` (True = refused)

    Returns
    -------
    dict
        ``tp, fp, tn, fn`` (counts) and ``tpr`` (= recall), ``fpr`` (over-refusal), ``precision``,
        ``recall``, ``f1``, ``accuracy``. An undefined ratio (0/0) is NaN, except F1 which is 0 when
        nothing is both predicted and true.
    """
    y = np.asarray(y_true, dtype=bool)
    p = np.asarray(y_pred, dtype=bool)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"y_true and y_pred must be [N] of the same length, got {y.shape} and {p.shape}")
    tp, fp = int((y & p).sum()), int((~y & p).sum())
    tn, fn = int((~y & ~p).sum()), int((y & ~p).sum())

    def ratio(a, b):
        return a / b if b else math.nan

    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "tpr": ratio(tp, tp + fn), "fpr": ratio(fp, fp + tn),
            "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
            "f1": ratio(2 * tp, 2 * tp + fp + fn) if tp else 0.0, "accuracy": ratio(tp + tn, y.size)}


# ---------------------------------------------------------------------------------------------------
# Choosing thresholds
# ---------------------------------------------------------------------------------------------------

@dataclass
class Choice:
    """Per-category thresholds chosen by one criterion.

    thresholds : float32 [C]; mode : "category" or "sum"; criterion : a short description;
    notes : remarks for the report (e.g. categories that had no labelled examples).
    """

    thresholds: np.ndarray
    mode: str
    criterion: str
    notes: list[str] = field(default_factory=list)


def _above(x: float) -> float:
    # The smallest float32 strictly above x: a threshold that refuses nothing scoring x or less.
    return float(np.nextafter(np.float32(x), np.float32(np.inf)))


def threshold_for_rate(scores, rate: float) -> float:
    """Largest threshold t with fraction(scores >= t) >= rate (ties may push the fraction above rate).

    ``rate`` 0 gives a threshold just above the highest score. Returns a float32-exact value.
    """
    s = np.sort(np.asarray(scores, dtype=np.float32))[::-1]
    rate = _check_rate(rate, "rate")
    if s.size == 0:
        raise ValueError("no scores to choose a threshold from")
    k = math.ceil(rate * s.size - 1e-9)  # the epsilon keeps 0.07 * 100 = 7.000000000000001 at 7
    return _above(s[0]) if k == 0 else float(s[k - 1])


def threshold_for_max_rate(scores, max_rate: float) -> float:
    """Smallest threshold t with fraction(scores >= t) <= max_rate. Returns a float32-exact value."""
    s = np.sort(np.asarray(scores, dtype=np.float32))[::-1]
    max_rate = _check_rate(max_rate, "max_rate")
    if s.size == 0:
        raise ValueError("no scores to choose a threshold from")
    m = math.floor(max_rate * s.size + 1e-9)
    return 0.0 if m >= s.size else _above(s[m])


def threshold_for_best_f1(y_true, scores) -> tuple[float, float]:
    """Threshold maximising F1 of "refuse iff score >= t"; the highest such t on ties.

    Returns (threshold, f1). Needs at least one positive.
    """
    y = np.asarray(y_true, dtype=bool)
    s = np.asarray(scores, dtype=np.float32)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"y_true and scores must be [N] of the same length, got {y.shape} and {s.shape}")
    if not y.any():
        raise ValueError("best F1 needs at least one positive example")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.diff(s) != 0, True]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    f1 = 2 * tp / (tp + fp + y.sum())   # 2TP / (2TP + FP + FN), FN = P - TP
    best = int(np.argmax(f1))           # first maximum = highest threshold
    return float(s[last_of_tie][best]), float(f1[best])


def _check_rate(rate: float, name: str) -> float:
    # numbers.Real takes numpy's scalars too (a rate read from an array); bools are not rates.
    if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, numbers.Real) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {rate!r}")
    return float(rate)


def _labels(probs, should_refuse, category) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = _probs(probs)
    y = np.asarray(should_refuse, dtype=bool)
    c = np.full(p.shape[0], -1, dtype=np.int64) if category is None else np.asarray(category, dtype=np.int64)
    if y.shape != (p.shape[0],) or c.shape != (p.shape[0],):
        raise ValueError(f"should_refuse and category must be [{p.shape[0]}], got {y.shape} and {c.shape}")
    if c.size and (c.min() < -1 or c.max() >= p.shape[1]):
        raise ValueError(f"category indices must lie in [-1, {p.shape[1]}), got [{c.min()}, {c.max()}]")
    return p, y, c


def _per_category(p, y, c, mode, uniform: float, pick, what: str, names) -> Choice:
    """Uniform threshold, refined per category token where that category has labelled prompts."""
    C = p.shape[1]
    names = list(names) if names is not None else [f"category {k}" for k in range(C)]
    t = np.full(C, uniform, dtype=np.float32)
    notes = []
    if mode == "category" and C > 1:
        for k in range(C):
            got = pick(k)
            if got is None:
                notes.append(f"{names[k]}: no labelled prompts of this category, kept the shared threshold "
                             f"{uniform:.4g}")
            else:
                t[k] = got
    return Choice(t, mode, what, notes)


def choose_for_target_rate(probs, should_refuse, category, target: float, mode: str = "category", *,
                           names: Optional[Sequence[str]] = None) -> Choice:
    """Thresholds that refuse at least ``target`` of the should-refuse prompts, as few more as allowed.

    With C = 1 or ``sum`` mode there is one threshold. With several category tokens (``category``
    mode) any token may refuse any prompt, so the thresholds are chosen together: every token c that
    has labelled prompts gets the largest threshold at which p_c alone fires on a fraction q of the
    should-refuse prompts of category c, and q is the smallest for which every such category's realised
    rate (any token firing) reaches ``target``, and so does the rate on should-refuse prompts of no
    labelled category (a note says so where even q = 1 leaves them short). Tokens of categories without
    labelled prompts keep the threshold shared by all tokens (chosen on max_c p_c); with no category
    labels at all every token takes it. ``target`` 0 refuses no should-refuse prompt (q = 0 puts each
    token above its probability on every should-refuse prompt).

    Parameters
    ----------
    probs : float ``[N, C]``; should_refuse : bool ``[N]``; category : int ``[N]`` or None
    target : float in [0, 1]
    mode : {"category", "sum"}
    names : category names for the notes (default ``"category <c>"``)

    Returns
    -------
    Choice
    """
    p, y, c = _labels(probs, should_refuse, category)
    _check_mode(mode)
    target = _check_rate(target, "target")
    if not y.any():
        raise ValueError("a target refusal rate needs should-refuse prompts")
    what = f"target refusal rate {target:g} on should-refuse prompts"
    uniform = threshold_for_rate(refusal_score(p[y], mode), target)
    own = {k: y & (c == k) for k in range(p.shape[1]) if (y & (c == k)).any()}
    if mode != "category" or p.shape[1] == 1 or not own:  # one shared threshold reaches the target
        return _per_category(p, y, c, mode, uniform, lambda k: None, what, names)
    rest = y & ~np.isin(c, list(own))  # should-refuse prompts of no labelled category
    groups = list(own.values()) + ([rest] if rest.any() else [])
    q = _shared_share(p, y, own, uniform, target, groups)
    what += f" (category tokens chosen together: each fires on a share {q:.3g} of its own category)"
    choice = _per_category(p, y, c, mode, uniform, lambda k: _share_threshold(p, y, own[k], k, q) if k in own
                           else None, what, names)
    if rest.any():
        got = (p[rest] >= choice.thresholds).any(axis=1).mean()
        if got < target - 1e-9:
            choice.notes.append(f"should-refuse prompts of no labelled category: refusal rate {got:.3g}, below "
                                f"the target {target:g} even with every labelled token at its lowest threshold")
    return choice


def _share_threshold(p: np.ndarray, y: np.ndarray, own: np.ndarray, k: int, q: float) -> float:
    # Token k's threshold firing on a share q of its own category; at q = 0 on no should-refuse prompt.
    return threshold_for_rate(p[own, k], q) if q > 0 else _above(p[y, k].max())


def _shared_share(p: np.ndarray, y: np.ndarray, own: dict, uniform: float, target: float, groups: list) -> float:
    """Smallest share q such that, with each labelled token at its `_share_threshold`, every group of
    should-refuse prompts (each labelled category, and those of none) has a realised refusal rate (any
    token firing) of at least ``target``; 1 when no q reaches it."""
    def reached(q: float) -> bool:
        t = np.full(p.shape[1], uniform, dtype=np.float32)
        for k, rows in own.items():
            t[k] = _share_threshold(p, y, rows, k, q)
        return all((p[rows] >= t).any(axis=1).mean() >= target - 1e-9 for rows in groups)

    qs = sorted({j / int(rows.sum()) for rows in own.values() for j in range(int(rows.sum()) + 1)})
    lo, hi = 0, len(qs) - 1               # reached() is monotone in q; q = 1 when nothing smaller reaches
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reached(qs[mid]) else (mid + 1, hi)
    return qs[lo]


def choose_for_max_over_refusal(probs, should_refuse, max_rate: float, mode: str = "category", *,
                                category=None) -> Choice:
    """Lowest thresholds whose over-refusal (refused should-comply prompts) stays at most ``max_rate``.

    With several category tokens every token gets the same budget q: t_c is the smallest threshold at
    which p_c fires on at most a fraction q of the should-comply prompts, and q is the largest for
    which the joint over-refusal (any token firing) is still at most ``max_rate``. Given ``category``,
    each labelled token's t_c is then raised to the lowest p_c of its own category's should-refuse
    prompts at or above it: lower, the token would only add other categories' prompts and
    should-comply ones, and switching their own token off would not stop their refusal.

    Parameters
    ----------
    probs : float ``[N, C]``; should_refuse : bool ``[N]``
    max_rate : float in [0, 1]
    mode : {"category", "sum"}
    category : int ``[N]`` or None
        Category of each should-refuse prompt (-1 unknown); used in ``category`` mode only.

    Returns
    -------
    Choice
    """
    p, y, c = _labels(probs, should_refuse, category)
    _check_mode(mode)
    max_rate = _check_rate(max_rate, "max_rate")
    neg = p[~y]
    if neg.shape[0] == 0:
        raise ValueError("a maximum over-refusal rate needs should-comply prompts")
    what = f"over-refusal at most {max_rate:g} on should-comply prompts"
    C = p.shape[1]
    if mode == "sum" or C == 1:
        t = threshold_for_max_rate(refusal_score(neg, mode), max_rate)
        return Choice(np.full(C, t, dtype=np.float32), mode, what)
    own = [p[y & (c == k), k] for k in range(C)]

    def at(m: int) -> np.ndarray:
        t = np.array([threshold_for_max_rate(neg[:, k], m / neg.shape[0]) for k in range(C)], dtype=np.float32)
        for k in range(C):
            caught = own[k][own[k] >= t[k]]
            if caught.size:
                t[k] = caught.min()
        return t

    def joint(m: int) -> float:
        return float((neg >= at(m)).any(axis=1).mean())

    lo, hi = 0, neg.shape[0]            # joint(0) = 0 <= max_rate; joint() is non-decreasing in m
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if joint(mid) <= max_rate else (lo, mid - 1)
    notes = [f"each category token may fire on at most {lo} of {neg.shape[0]} should-comply prompts"]
    if any(x.size for x in own):
        notes.append("each labelled category token raised to the lowest score of its own category it still catches")
    return Choice(at(lo), mode, what, notes)


def choose_best_f1(probs, should_refuse, category, mode: str = "category", *,
                   names: Optional[Sequence[str]] = None) -> Choice:
    """Thresholds maximising F1 of refusing should-refuse prompts.

    With several category tokens, token c maximises the F1 of "p_c >= t" with the should-refuse prompts
    of category c as positives and every should-comply prompt as negatives (refusals of other
    categories are left out: they are another token's job). A category without labelled prompts
    keeps the threshold shared by all tokens (best F1 of max_c p_c).

    Parameters
    ----------
    probs : float ``[N, C]``; should_refuse : bool ``[N]``; category : int ``[N]`` or None
    mode : {"category", "sum"}
    names : category names for the notes (default ``"category <c>"``)

    Returns
    -------
    Choice
    """
    p, y, c = _labels(probs, should_refuse, category)
    _check_mode(mode)
    uniform, _ = threshold_for_best_f1(y, refusal_score(p, mode))

    def pick(k):
        own = y & (c == k)
        if not own.any():
            return None
        rows = own | ~y
        return threshold_for_best_f1(own[rows], p[rows, k])[0]

    what = "best F1" + (" (each category token: its own category vs should-comply prompts)"
                        if mode == "category" and p.shape[1] > 1 else "")
    return _per_category(p, y, c, mode, uniform, pick, what, names)


def switch_off_effect(probs, thresholds, groups, num_groups: int) -> np.ndarray:
    """Refusal rate of every group with each category switched off in turn (``category`` mode).

    Parameters
    ----------
    probs : float ``[N, C]``
    thresholds : float ``[C]`` baseline
    groups : int ``[N]`` (-1: no group)
    num_groups : int

    Returns
    -------
    np.ndarray
        float64 ``[C + 1, num_groups]``: row 0 the baseline, row 1 + c with threshold c set above 1.
    """
    p = _probs(probs)
    base = _thresholds(thresholds, p.shape[1])
    rows = []
    for off in [None] + list(range(p.shape[1])):
        t = base.copy()
        if off is not None:
            t[off] = OFF
        rows.append(rates_by_group(decisions(p, t, "category") >= 0, groups, num_groups))
    return np.stack(rows)
