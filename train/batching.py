"""From tokenized examples to batches: per-epoch mixing, optional packing, a resumable row stream and
collation into model inputs with completion-only targets.

Everything here is a pure function of (examples, config, seed, epoch): every rank of a distributed run
builds the same stream and takes its own share of each step, and a resumed run continues from
``(epoch, cursor)`` with nothing else to restore.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .data import POOLS, Example


def parse_mix(text: str | None) -> tuple[float, ...] | None:
    """``"refusal:contrast:respond"`` weights, e.g. ``"1:1:2"``; None or ``"natural"`` keeps pool sizes."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "natural")):
        return None
    parts = text.split(":") if isinstance(text, str) else list(text)
    try:
        w = tuple(float(x) for x in parts)
    except (TypeError, ValueError):
        raise ValueError(f"mix must look like 'refusal:contrast:respond', e.g. '1:1:2'; got {text!r}") from None
    if len(w) != len(POOLS) or any(not np.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"mix needs {len(POOLS)} non-negative weights (refusal:contrast:respond) with a "
                         f"positive sum, got {text!r}")
    return w


def examples_digest(examples) -> str:
    """SHA-256 over the examples in order (pool, prompt length, token ids): the same digest means the same
    rows for the same stream settings, whatever files the examples were read from."""
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.pool}:{e.n_prompt}:{len(e.ids)};".encode())
        h.update(np.asarray(e.ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def epoch_order(pool_sizes: dict[str, int], mix, epoch_examples: int | None, seed: int,
                epoch: int) -> list[tuple[str, int]]:
    """The examples of one epoch as ``(pool, index)`` pairs, shuffled.

    Without ``mix`` every example appears once. With weights ``w``, pool ``i`` contributes
    ``round(w_i / sum(w) * E)`` examples (``E = epoch_examples``, default the total pool size): a pool
    with fewer is repeated (reshuffled each pass), one with more is subsampled (a fresh subset each
    epoch).
    """
    if mix is None:
        counts = {p: pool_sizes.get(p, 0) for p in POOLS}
    else:
        total = epoch_examples if epoch_examples is not None else sum(pool_sizes.values())
        counts = {p: int(round(w / sum(mix) * total)) for p, w in zip(POOLS, mix)}
        empty = [p for p in POOLS if counts[p] and not pool_sizes.get(p)]
        if empty:
            raise ValueError(f"mix asks for examples from empty pool(s) {empty}")
    order = []
    for k, pool in enumerate(POOLS):
        n, size = counts[pool], pool_sizes.get(pool, 0)
        rng = np.random.default_rng([seed, epoch, k])
        idx = np.concatenate([rng.permutation(size) for _ in range(-(-n // size))]) if n else np.empty(0, int)
        order += [(pool, int(i)) for i in idx[:n]]
    perm = np.random.default_rng([seed, epoch, len(POOLS)]).permutation(len(order))
    return [order[i] for i in perm]


def pack_rows(lengths, seq_len: int) -> list[list[int]]:
    """Greedy in-order packing: consecutive items share a row while their total fits ``seq_len``."""
    rows, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"item {i} has {n} tokens, more than seq_len={seq_len}")
        if cur and used + n > seq_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows


class RowStream:
    """An endless, resumable stream of rows (lists of examples), epoch after epoch.

    Parameters
    ----------
    examples : list of Example
    seq_len : int
    packing : bool
        Pack several examples per row (up to ``seq_len`` tokens) instead of one.
    mix, epoch_examples, seed
        See `epoch_order`.
    """

    def __init__(self, examples: list[Example], *, seq_len: int, packing: bool = False, mix=None,
                 epoch_examples: int | None = None, seed: int = 0):
        if not examples:
            raise ValueError("no examples")
        self.pools: dict[str, list[Example]] = {p: [e for e in examples if e.pool == p] for p in POOLS}
        unknown = {e.pool for e in examples} - set(POOLS)
        if unknown:
            raise ValueError(f"examples with unknown pool(s) {sorted(unknown)}")
        self.seq_len, self.packing, self.mix = seq_len, packing, mix
        self.epoch_examples, self.seed = epoch_examples, seed
        self.epoch, self.cursor = 0, 0
        self._rows: tuple[int, list[list[Example]]] | None = None

    def rows(self, epoch: int) -> list[list[Example]]:
        """All rows of an epoch (cached for the current one)."""
        if self._rows is None or self._rows[0] != epoch:
            sizes = {p: len(v) for p, v in self.pools.items()}
            items = [self.pools[p][i] for p, i in epoch_order(sizes, self.mix, self.epoch_examples, self.seed, epoch)]
            if not items:
                raise ValueError("the mix selects no examples")
            groups = pack_rows([len(e.ids) for e in items], self.seq_len) if self.packing else \
                [[i] for i in range(len(items))]
            self._rows = (epoch, [[items[i] for i in g] for g in groups])
        return self._rows[1]

    def take(self, n: int) -> list[list[Example]]:
        """The next ``n`` rows, continuing into the next epoch when one ends."""
        out = []
        while len(out) < n:
            rows = self.rows(self.epoch)
            got = rows[self.cursor:self.cursor + n - len(out)]
            out += got
            self.cursor += len(got)
            if self.cursor >= len(rows):
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


@dataclass
class Batch:
    """Model inputs for one micro-batch.

    ``tokens`` [B, T]; ``positions`` [B, T] and ``attn_mask`` [B, T, T] only when packed (else None:
    plain causal attention); ``target_index`` [N] flat indices into ``B*T`` of the positions that
    predict a target; ``targets`` [N]; ``target_weight`` [N] float32 loss weights, or None when every
    target weighs 1; ``n_tokens``: real (non-pad) tokens.
    """

    tokens: torch.Tensor
    positions: torch.Tensor | None
    attn_mask: torch.Tensor | None
    target_index: torch.Tensor
    targets: torch.Tensor
    n_tokens: int
    target_weight: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        mv = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return Batch(mv(self.tokens), mv(self.positions), mv(self.attn_mask), mv(self.target_index),
                     mv(self.targets), self.n_tokens, mv(self.target_weight))


def count_targets(rows, control_weight: float = 1.0) -> float:
    """Trained tokens in rows (each example's targets: control token through end of turn), the control
    token counted ``control_weight`` times: the denominator of the weighted mean loss."""
    n = sum(len(e.ids) - e.n_prompt for row in rows for e in row)
    return n if control_weight == 1.0 else n + (control_weight - 1.0) * sum(len(row) for row in rows)


def collate(rows: list[list[Example]], *, pad_id: int = 0, packed: bool | None = None,
            pad_multiple: int = 8, control_weight: float = 1.0) -> Batch:
    """Pad rows to a common length and list the positions whose next token is trained.

    With ``packed`` (default: any row holds more than one example) each example gets positions from 0
    and attends only within itself; padding forms its own segment so no attention row is empty.
    ``control_weight`` != 1 weights each example's first target (its control token) by that much in
    the loss (``target_weight``); the other targets weigh 1.
    """
    if not rows or any(not r for r in rows):
        raise ValueError("collate needs non-empty rows")
    packed = any(len(r) > 1 for r in rows) if packed is None else packed
    lengths = [sum(len(e.ids) for e in r) for r in rows]
    T = -(-max(lengths) // pad_multiple) * pad_multiple
    B = len(rows)
    tokens = torch.full((B, T), pad_id, dtype=torch.int64)
    seg = torch.full((B, T), -1, dtype=torch.int64)
    pos = torch.zeros((B, T), dtype=torch.int64)
    t_index, targets, control_at = [], [], []   # control_at: each example's first target in `targets`
    n_targets = 0
    for b, row in enumerate(rows):
        o = 0
        for s, e in enumerate(row):
            n = len(e.ids)
            tokens[b, o:o + n] = torch.tensor(e.ids, dtype=torch.int64)
            seg[b, o:o + n] = s
            pos[b, o:o + n] = torch.arange(n)
            # position t predicts ids[t + 1]; targets are ids[n_prompt:]
            t_index.append(torch.arange(b * T + o + e.n_prompt - 1, b * T + o + n - 1))
            targets.append(torch.tensor(e.ids[e.n_prompt:], dtype=torch.int64))
            control_at.append(n_targets)
            n_targets += n - e.n_prompt
            o += n
    positions = attn_mask = None
    if packed:
        positions = pos
        seg = torch.where(seg < 0, len(rows[0]) + 10**6, seg)   # padding: a segment of its own
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        attn_mask = (seg[:, :, None] == seg[:, None, :]) & causal
    targets = torch.cat(targets)
    weight = None
    if control_weight != 1.0:
        weight = torch.ones(len(targets), dtype=torch.float32)
        weight[control_at] = control_weight
    return Batch(tokens, positions, attn_mask, torch.cat(t_index), targets, sum(lengths), weight)
