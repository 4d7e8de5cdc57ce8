"""Thresholds for a maximum over-refusal that keep every category switchable.

`choose_for_max_over_refusal` lowers thresholds until the should-comply budget is spent, and a token
with a low threshold then catches other categories' prompts: switching one of those categories off
no longer stops its refusals, and switching the token's own category off drops the others. Here the
search is greedy and checks the switch-off effect at every step, on the calibration prompts:

- over-refusal (should-comply prompts refused by any token) stays at most ``max_rate``;
- switching category x off (its threshold above 1) drops x's refusal rate by at least ``min_drop``
  (relative): few of x's refused prompts are also caught by another token;
- and moves every other category's rate by at most ``max_move`` (absolute): few of its prompts are
  caught by token x alone.

Conventions as in `rtkern.calibrate` (``probs`` ``[N, C]``, ``category`` -1 for unknown).
"""
from __future__ import annotations

from itertools import combinations
from typing import Optional, Sequence

import numpy as np

from .argtypes import positive_int
from .calibrate import OFF, Choice, _check_rate, _labels

PAIR_LOOKAHEAD = 8  # 8 x 8 x C(C, 2) trials per stuck step: 640 for five categories


def control_holds(probs, thresholds, should_refuse, category, max_rate: float, *, min_drop: float = 0.8,
                  max_move: float = 0.05) -> bool:
    """Whether ``thresholds`` meet the three conditions of `choose_controllable` on these prompts.

    Parameters
    ----------
    probs : float ``[N, C]``; thresholds : float ``[C]``; should_refuse : bool ``[N]``
    category : int ``[N]`` (-1 unknown); max_rate, min_drop, max_move : float in [0, 1]
    """
    p, y, c = _labels(probs, should_refuse, category)
    t = np.asarray(thresholds, dtype=np.float32)
    if t.shape != (p.shape[1],):
        raise ValueError(f"thresholds must be [{p.shape[1]}], got {t.shape}")
    return _holds(p >= t, y, _members(y, c, p.shape[1]), max_rate, min_drop, max_move)


def _members(y: np.ndarray, c: np.ndarray, C: int) -> np.ndarray:
    # [N, C] int: row i is a should-refuse prompt of category k.
    return ((c[:, None] == np.arange(C)) & y[:, None]).astype(np.int64)


def _holds(fired: np.ndarray, y: np.ndarray, members: np.ndarray, max_rate: float, min_drop: float,
           max_move: float) -> bool:
    eps = 1e-9  # rates are counts over counts: 2 of 40 is a move of exactly 0.05
    refused = fired.any(axis=1)
    if (~y).any() and refused[~y].sum() > max_rate * (~y).sum() + eps:
        return False
    n_fired = fired.sum(axis=1, keepdims=True)
    size = members.sum(axis=0)
    base = members.T @ refused                              # [C] refused prompts of each category
    kept = np.diagonal(members.T @ (n_fired - fired > 0))   # [C] ... still refused with its token off
    if (kept > (1 - min_drop) * base + eps).any():
        return False
    alone = members.T @ (fired & (n_fired == 1))            # [k, x]: prompts of k refused by token x alone
    np.fill_diagonal(alone, 0)
    return bool((alone <= max_move * size[:, None] + eps).all())


def choose_controllable(probs, should_refuse, category, max_rate: float, *, min_drop: float = 0.8,
                        max_move: float = 0.05, lookahead: int = 32,
                        names: Optional[Sequence[str]] = None) -> Choice:
    """Thresholds with over-refusal at most ``max_rate`` that keep each category switchable (``category`` mode).

    Greedy: every token starts switched off (refusing nothing). Each step lowers one labelled token's
    threshold to one of the next ``lookahead`` lower scores of its own category's should-refuse
    prompts, so a threshold always sits on an own-category prompt. Among the steps after which all
    three conditions of the module docstring still hold, it takes one that adds no over-refusal and
    the most refusals, else the most refusals per over-refusal added. When no step is allowed it
    tries lowering two tokens at once (each to one of its next 8 scores), and stops when that fails
    too. The result is not always the best setting, but every setting it returns meets the
    conditions on these prompts (`control_holds`).

    Parameters
    ----------
    probs : float ``[N, C]`` with C >= 2; should_refuse : bool ``[N]``; category : int ``[N]`` (-1 unknown)
    max_rate : float in [0, 1]
        Largest fraction of should-comply prompts refused.
    min_drop : float in [0, 1]
        Smallest relative drop of a category's refusal rate when it is switched off.
    max_move : float in [0, 1]
        Largest absolute change of another category's rate when one is switched off.
    lookahead : int >= 1
        Candidate thresholds per token and step.
    names : category names for the notes (default ``"category <c>"``)

    Returns
    -------
    Choice
        Tokens never lowered (no labelled prompts, or no allowed step) stay at 2.0, switched off.
    """
    p, y, c = _labels(probs, should_refuse, category)
    C = p.shape[1]
    if C < 2:
        raise ValueError(f"keeping categories switchable needs several category tokens, got {C}")
    for value, what in ((max_rate, "max_rate"), (min_drop, "min_drop"), (max_move, "max_move")):
        _check_rate(value, what)
    positive_int(lookahead, "lookahead")
    if not (y & (c >= 0)).any():
        raise ValueError("keeping categories switchable needs should-refuse prompts with a category")
    members = _members(y, c, C)
    cand = [np.unique(p[y & (c == k), k])[::-1] for k in range(C)]   # descending own-category scores
    t = np.full(C, OFF, dtype=np.float32)
    nxt = [0] * C
    limits = (max_rate, min_drop, max_move)
    while True:
        step = (_best_step(p, y, members, t, cand, _moves(cand, nxt, lookahead, 1), limits)
                or _best_step(p, y, members, t, cand, _moves(cand, nxt, min(lookahead, PAIR_LOOKAHEAD), 2), limits))
        if step is None:
            break
        for k, j in step:
            t[k], nxt[k] = cand[k][j], j + 1
    names = list(names) if names is not None else [f"category {k}" for k in range(C)]
    notes = [f"{names[k]}: no allowed threshold, switched off" for k in range(C) if t[k] > 1]
    what = (f"over-refusal at most {max_rate:g}, keeping every category switchable (off: own rate -"
            f"{100 * min_drop:g}% or more, others within {100 * max_move:g} points)")
    return Choice(t, "category", what, notes)


def _moves(cand, nxt, width: int, size: int) -> list:
    # Each move lowers `size` distinct tokens, each to one of its next `width` own-category scores.
    ranges = [[(k, j) for j in range(nxt[k], min(nxt[k] + width, len(cand[k])))] for k in range(len(cand))]
    if size == 1:
        return [[m] for r in ranges for m in r]
    return [[a, b] for k1, k2 in combinations(range(len(cand)), 2) for a in ranges[k1] for b in ranges[k2]]


def _best_step(p, y, members, t, cand, moves, limits) -> Optional[list]:
    fired = p >= t
    pos, neg = fired[y].any(axis=1).sum(), fired[~y].any(axis=1).sum()
    best, best_key = None, None
    for move in moves:
        trial = fired.copy()
        for k, j in move:
            trial[:, k] = p[:, k] >= cand[k][j]
        refused = trial.any(axis=1)
        dp, dn = int(refused[y].sum() - pos), int(refused[~y].sum() - neg)
        if dp <= 0:
            continue
        key = (dn == 0, dp if dn == 0 else dp / dn)
        if (best_key is None or key > best_key) and _holds(trial, y, members, *limits):
            best, best_key = move, key
    return best
