"""Markdown report and PNG plots of a calibration run (``rtkern calibrate``), from scores and labels only."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .calibrate import (Choice, auroc, binary_metrics, decisions, rate_curve, rates_by_group, refusal_score,
                        roc_curve, switch_off_effect, sweep)

TABLE_GRID = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
PLOT_GRID = np.linspace(0.0, 1.0, 201)


@dataclass
class Analysis:
    """Scores, labels and the chosen thresholds of one calibration run.

    probs : float32 [N, C] refusal-token probabilities (spec order)
    should_refuse : bool [N]
    group : int64 [N] index into ``group_names`` (the prompts' data categories), -1 none
    group_names : list of str; when C > 1 the first C are the spec's names (group c <-> token c)
    names : spec category names, length C
    choice : the chosen thresholds
    """

    probs: np.ndarray
    should_refuse: np.ndarray
    group: np.ndarray
    group_names: list
    names: tuple
    choice: Choice

    @property
    def refused(self) -> np.ndarray:
        """int64 [N]: refusal category at the chosen thresholds, -1 answered."""
        return decisions(self.probs, self.choice.thresholds, self.choice.mode)

    def headline(self) -> dict:
        """Binary metrics at the chosen thresholds plus the AUROC of the shared-threshold score."""
        m = binary_metrics(self.should_refuse, self.refused >= 0)
        m["auroc"] = self.auroc(None)
        return m

    def auroc(self, group: Optional[int]) -> float:
        """AUROC of original vs contrast within a group (None: all prompts); NaN if a class is missing."""
        keep = np.ones(len(self.should_refuse), bool) if group is None else self.group == group
        y = self.should_refuse[keep]
        if y.all() or not y.any():
            return math.nan
        return auroc(y, refusal_score(self.probs[keep], self.choice.mode))


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x: float, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _count(a: Analysis, mask: np.ndarray) -> list[int]:
    return np.bincount(a.group[mask & (a.group >= 0)], minlength=len(a.group_names)).tolist()


def _thresholds_section(a: Analysis) -> str:
    t = a.choice.thresholds
    if a.choice.mode == "sum":
        body = f"One threshold on the summed refusal probability: **{t[0]:.4g}**."
    else:
        body = _table(["category", "threshold"], [[n, f"{v:.4g}" + (" (off)" if v > 1 else "")]
                                                 for n, v in zip(a.names, t)])
    notes = "".join(f"\n- {n}" for n in a.choice.notes)
    return f"## Chosen thresholds ({a.choice.criterion}, mode `{a.choice.mode}`)\n\n{body}\n{notes}\n"


def _rates_section(a: Analysis) -> str:
    refused = a.refused >= 0
    rows = []
    for label, mask in (("should refuse (original)", a.should_refuse), ("should comply (contrast)", ~a.should_refuse)):
        n = _count(a, mask)
        rate = rates_by_group(refused & mask, np.where(mask, a.group, -1), len(a.group_names))
        for g, name in enumerate(a.group_names):
            if n[g]:
                rows.append([label, name, n[g], _pct(rate[g])])
        if mask.any():
            rows.append([label, "**all**", int(mask.sum()), _pct(refused[mask].mean())])
    m = a.headline()
    metrics = _table(["TPR (recall)", "FPR (over-refusal)", "precision", "F1", "accuracy", "AUROC"],
                     [[_pct(m["tpr"]), _pct(m["fpr"]), _pct(m["precision"]), _num(m["f1"]), _pct(m["accuracy"]),
                       _num(m["auroc"])]])
    out = ("## Refusal rates at the chosen thresholds\n\n" + _table(["set", "category", "prompts", "refused"], rows)
           + "\n\n" + metrics + "\n")
    if len(a.names) > 1 and a.choice.mode == "category":
        out += _category_accuracy(a, refused)
    return out


def _category_accuracy(a: Analysis, refused: np.ndarray) -> str:
    # Refused should-refuse prompts whose refusal token is their own category (group c <-> token c).
    mask = a.should_refuse & refused & (a.group >= 0) & (a.group < len(a.names))
    if not mask.any():
        return ""
    right = (a.refused[mask] == a.group[mask]).mean()
    return (f"\nOf the refused should-refuse prompts with a known category, {_pct(right)} were refused with "
            f"their own category token.\n")


def _auroc_section(a: Analysis) -> str:
    score = "max_c p_c" if a.choice.mode == "category" else "sum_c p_c"
    rows = [["**all**", int(a.should_refuse.sum()), int((~a.should_refuse).sum()), _num(a.auroc(None))]]
    n_pos, n_neg = _count(a, a.should_refuse), _count(a, ~a.should_refuse)
    for g, name in enumerate(a.group_names):
        if n_pos[g] and n_neg[g]:
            rows.append([name, n_pos[g], n_neg[g], _num(a.auroc(g))])
    return (f"## Separability (AUROC of `{score}`, original vs contrast)\n\n"
            + _table(["category", "should refuse", "should comply", "AUROC"], rows) + "\n")


def _sweep_section(a: Analysis) -> str:
    header, cols = ["threshold"], []
    for label, mask in (("refuse", a.should_refuse), ("comply", ~a.should_refuse)):
        if not mask.any():
            continue
        rates = sweep(a.probs[mask], a.group[mask], len(a.group_names), TABLE_GRID, a.choice.mode)
        n = _count(a, mask)
        for g, name in enumerate(a.group_names):
            if n[g]:
                header.append(f"{label}: {name}")
                cols.append(rates[:, g])
        header.append(f"{label}: all")
        cols.append(rates[:, -1])
    rows = [[f"{t:g}"] + [_pct(c[i]) for c in cols] for i, t in enumerate(TABLE_GRID)]
    what = "max_c p_c" if a.choice.mode == "category" else "sum_c p_c"
    return ("## Refusal rate vs one threshold shared by every category\n\n"
            f"A prompt is refused when `{what}` is at least the threshold. Columns: prompts that should be "
            "refused (original) and should be answered (contrast), per category.\n\n" + _table(header, rows) + "\n")


def _switch_off_section(a: Analysis) -> str:
    if a.choice.mode != "category":
        return "## Switching a category off\n\nNot applicable in `sum` mode (one threshold for all categories).\n"
    mask = a.should_refuse
    groups = np.where(mask, a.group, -1)
    n = _count(a, mask)
    shown = [g for g in range(len(a.group_names)) if n[g]]
    eff = switch_off_effect(a.probs, a.choice.thresholds, groups, len(a.group_names))
    over = switch_off_effect(a.probs, a.choice.thresholds, np.where(mask, -1, 0), 1)[:, 0]
    rows = []
    for r, label in enumerate(["(none)"] + list(a.names)):
        cells = []
        for g in shown:
            cell = _pct(eff[r, g])
            if r and eff[0, g] > 0:
                cell += f" ({100 * (eff[r, g] - eff[0, g]) / eff[0, g]:+.0f}%)"
            cells.append(cell)
        rows.append([label] + cells + [_pct(over[r])])
    return ("## Switching one category off (its threshold set above 1, the others kept)\n\n"
            "Refusal rate of the should-refuse prompts of each category (relative change from the first row), "
            "and the over-refusal rate on should-comply prompts.\n\n"
            + _table(["switched off"] + [a.group_names[g] for g in shown] + ["over-refusal"], rows) + "\n")


def build_report(a: Analysis, meta: dict) -> str:
    """The markdown report: run facts (``meta``: key -> value), thresholds, rates, AUROC, sweep, switch-off."""
    facts = "\n".join(f"- **{k}**: {v}" for k, v in meta.items())
    parts = ["# rtkern calibration report\n", facts + "\n", _thresholds_section(a), _rates_section(a),
             _auroc_section(a), _sweep_section(a), _switch_off_section(a),
             "## Plots\n\n- `refusal_rate.png`: refusal rate vs a shared threshold per category, original "
             "(should refuse) and contrast (should comply); dotted: the chosen threshold.\n"
             "- `roc.png`: ROC of the shared-threshold score, all prompts and per category; the dot is the "
             "chosen operating point.\n"]
    return "\n".join(parts)


def _figure(n_panels: int, size=(4.0, 3.2)):
    from matplotlib.figure import Figure
    cols = min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]


def _panel_groups(a: Analysis) -> list[Optional[int]]:
    n = np.bincount(a.group[a.group >= 0], minlength=len(a.group_names))
    return [None] + [g for g in range(len(a.group_names)) if n[g]]


def plot_rates(path, a: Analysis) -> Path:
    """PNG: refusal rate vs shared threshold, one panel per category (+ all), original vs contrast."""
    panels = _panel_groups(a)
    fig, axes = _figure(len(panels))
    for ax, g in zip(axes, panels):
        keep = np.ones(len(a.group), bool) if g is None else a.group == g
        for label, mask, color in (("should refuse (original)", a.should_refuse, "tab:red"),
                                   ("should comply (contrast)", ~a.should_refuse, "tab:blue")):
            m = keep & mask
            if m.any():
                ax.plot(PLOT_GRID, rate_curve(refusal_score(a.probs[m], a.choice.mode), PLOT_GRID),
                        color=color, label=f"{label}, n={int(m.sum())}")
        t = _panel_threshold(a, g)
        if t is not None and t <= 1:
            ax.axvline(t, color="gray", linestyle=":", linewidth=1)
        ax.set_title("all prompts" if g is None else a.group_names[g], fontsize=9)
        ax.set_xlabel("threshold")
        ax.set_ylabel("refusal rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _panel_threshold(a: Analysis, g: Optional[int]) -> Optional[float]:
    t = a.choice.thresholds
    if a.choice.mode == "sum" or len(t) == 1:
        return float(t[0])
    return float(t[g]) if g is not None and g < len(t) else None


def plot_roc(path, a: Analysis) -> Path:
    """PNG: ROC curves (all prompts and each category with both classes) with the chosen operating point."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for g in _panel_groups(a):
        keep = np.ones(len(a.group), bool) if g is None else a.group == g
        y = a.should_refuse[keep]
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, refusal_score(a.probs[keep], a.choice.mode))
        name = "all prompts" if g is None else a.group_names[g]
        ax.plot(fpr, tpr, linewidth=2 if g is None else 1, label=f"{name} (AUROC {a.auroc(g):.3f})")
    if a.should_refuse.any() and (~a.should_refuse).any():
        m = binary_metrics(a.should_refuse, a.refused >= 0)
        ax.plot([m["fpr"]], [m["tpr"]], "ko", label="chosen thresholds")
    ax.plot([0, 1], [0, 1], color="lightgray", linestyle="--", linewidth=1)
    ax.set_xlabel("false positive rate (over-refusal on contrast)")
    ax.set_ylabel("true positive rate (refusal on original)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
