"""Labelled prompt sets for calibration: the CoCoNot eval folder, or any CSV/JSONL with prompt and label.

* CoCoNot folder (``coconot_eval.jsonl`` + ``coconot_contrast_eval.jsonl``): the test split of the
  original prompts (``int(sha256(id)[:8], 16) % 10 < 3``, see ``shared/data/README.md``) should be
  refused, with their category; every contrast prompt should be answered.
* CSV (header row) or JSONL (one object a line) with ``prompt`` and ``label`` (``refuse``/``comply``,
  ``1``/``0``, ``true``/``false``) and an optional ``category``; UTF-8, a leading BOM allowed. A malformed
  row raises ValueError naming ``file:line``.
* ``scores.jsonl`` written by ``rtkern calibrate`` (`load_scores`): the prompts with their labels and
  every control token's probability, to choose thresholds again without the model.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .argtypes import positive_int
from .spec import CATEGORIES

COCONOT_ORIGINAL = "coconot_eval.jsonl"
COCONOT_CONTRAST = "coconot_contrast_eval.jsonl"
_ALIASES = {"unknowns": "Indeterminate requests"}  # CoCoNot's legacy name
_REFUSE = {"refuse", "refusal", "1", "true", "yes"}
_COMPLY = {"comply", "compliance", "respond", "0", "false", "no"}


@dataclass
class LabelledPrompts:
    """Prompts with labels.

    prompts : list of str, length N
    should_refuse : bool ndarray [N]
    categories : list of (str or None), length N; canonical CoCoNot names where they match
    sources : list of str, length N; ``file:line`` of each prompt
    """

    prompts: list
    should_refuse: np.ndarray
    categories: list
    sources: list

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, index: Sequence[int]) -> "LabelledPrompts":
        idx = [int(i) for i in index]
        return LabelledPrompts([self.prompts[i] for i in idx], self.should_refuse[idx],
                               [self.categories[i] for i in idx], [self.sources[i] for i in idx])

    def category_names(self, first: Sequence[str] = ()) -> list[str]:
        """``first`` followed by the other categories present, in order of appearance."""
        names = list(first)
        for c in self.categories:
            if c is not None and c not in names:
                names.append(c)
        return names

    def category_index(self, names: Sequence[str]) -> np.ndarray:
        """int64 [N]: index of each prompt's category in ``names``, -1 when absent or unknown."""
        pos = {n: i for i, n in enumerate(names)}
        return np.array([pos.get(c, -1) if c is not None else -1 for c in self.categories], dtype=np.int64)


def concat(parts: Sequence[LabelledPrompts]) -> LabelledPrompts:
    """Join labelled sets in order."""
    return LabelledPrompts([p for s in parts for p in s.prompts],
                           np.concatenate([s.should_refuse for s in parts]) if parts else np.zeros(0, bool),
                           [c for s in parts for c in s.categories], [x for s in parts for x in s.sources])


def canonical_category(name) -> Optional[str]:
    """Strip and map to a CoCoNot category name (case-insensitive, ``Unknowns`` alias); else keep as is."""
    if name is None:
        return None
    s = str(name).strip()
    if not s:
        return None
    low = s.lower()
    for c in CATEGORIES:
        if low == c.lower():
            return c
    return _ALIASES.get(low, s)


def coconot_is_test(example_id: str) -> bool:
    """The fixed CoCoNot split: test iff int(sha256(id)[:8], 16) % 10 < 3."""
    return int(hashlib.sha256(example_id.encode()).hexdigest()[:8], 16) % 10 < 3


def load_labelled(path) -> LabelledPrompts:
    """Load a CoCoNot folder, a ``.csv`` file or a ``.jsonl`` file (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        return load_coconot(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _load_csv(path)
    if suffix in (".jsonl", ".ndjson"):
        return _load_jsonl(path)
    raise ValueError(f"{path}: unsupported data file type {suffix!r} (use .csv, .jsonl or a CoCoNot folder)")


def load_coconot(folder) -> LabelledPrompts:
    """The CoCoNot eval folder: test-split originals (should refuse) then all contrast prompts (comply)."""
    folder = Path(folder)
    files = [folder / COCONOT_ORIGINAL, folder / COCONOT_CONTRAST]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise FileNotFoundError(f"{folder}: not a CoCoNot folder (missing {', '.join(absent)}; expected "
                                f"{COCONOT_ORIGINAL} and {COCONOT_CONTRAST})")
    parts = []
    for f, refuse in zip(files, (True, False)):
        prompts, cats, srcs = [], [], []
        for line, obj in _jsonl_objects(f):
            where = f"{f}:{line}"
            for key in ("id", "prompt", "category"):
                if not isinstance(obj.get(key), str):
                    raise ValueError(f"{where}: field {key!r} must be a string")
            if refuse and not coconot_is_test(obj["id"]):
                continue
            prompts.append(_prompt(obj["prompt"], where))
            cats.append(canonical_category(obj["category"]))
            srcs.append(where)
        parts.append(LabelledPrompts(prompts, np.full(len(prompts), refuse), cats, srcs))
    return concat(parts)


def _prompt(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string")
    return value


def _label(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    s = str(value).strip().lower() if isinstance(value, str) else None
    if s in _REFUSE:
        return True
    if s in _COMPLY:
        return False
    raise ValueError(f"{where}: 'label' must be refuse/comply or 1/0, got {value!r}")


def _jsonl_objects(path: Path):
    from .train.data import iter_jsonl
    for n, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj


def _rows(path: Path, required: Sequence[str]):
    """(line, row dict) from a CSV with a header naming ``required``; the line is where the record starts."""
    from .train.data import check_csv_header, open_utf8
    with open_utf8(path, newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ValueError(f"{path}:1: empty file (expected a header with 'prompt' and 'label')") from None
        except csv.Error as e:
            raise ValueError(f"{path}:1: malformed CSV ({e})") from e
        check_csv_header(path, header)
        missing = [k for k in required if k not in header]
        if missing:
            raise ValueError(f"{path}:1: header has no column {missing[0]!r} (columns: {header})")
        start = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise ValueError(f"{path}:{start}: malformed CSV ({e})") from e
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{line}: expected {len(header)} fields ({', '.join(header)}), "
                                 f"got {len(row)}")
            yield line, dict(zip(header, row))


def _load_csv(path: Path) -> LabelledPrompts:
    prompts, labels, cats, srcs = [], [], [], []
    for line, row in _rows(path, ("prompt", "label")):
        _add(row, f"{path}:{line}", prompts, labels, cats, srcs)
    return _finish(path, prompts, labels, cats, srcs)


def _load_jsonl(path: Path) -> LabelledPrompts:
    prompts, labels, cats, srcs = [], [], [], []
    for line, obj in _jsonl_objects(path):
        where = f"{path}:{line}"
        missing = [k for k in ("prompt", "label") if k not in obj]
        if missing:
            raise ValueError(f"{where}: missing field {missing[0]!r}")
        _add(obj, where, prompts, labels, cats, srcs)
    return _finish(path, prompts, labels, cats, srcs)


def _add(row: dict, where: str, prompts, labels, cats, srcs) -> None:
    prompts.append(_prompt(row["prompt"], where))
    labels.append(_label(row["label"], where))
    cat = row.get("category")
    if cat is not None and not isinstance(cat, str):
        raise ValueError(f"{where}: 'category' must be a string, got {cat!r}")
    cats.append(canonical_category(cat))
    srcs.append(where)


def _finish(path: Path, prompts, labels, cats, srcs) -> LabelledPrompts:
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return LabelledPrompts(prompts, np.array(labels, dtype=bool), cats, srcs)


def even_subset(data: LabelledPrompts, limit: int) -> LabelledPrompts:
    """At most ``limit`` prompts of each label, evenly spaced through the file order (so every category
    of a file sorted by category still appears)."""
    positive_int(limit, "limit")
    keep = []
    for label in (True, False):
        idx = np.flatnonzero(data.should_refuse == label)
        if idx.size > limit:
            idx = idx[np.linspace(0, idx.size - 1, limit).round().astype(int)]
        keep.extend(idx.tolist())
    return data.subset(sorted(keep))


@dataclass
class SavedScores:
    """A ``scores.jsonl`` read back: ``scores`` float32 [N, C] (+ a respond column when ``has_respond``)."""

    data: LabelledPrompts
    scores: np.ndarray
    names: list
    has_respond: bool


def load_scores(path) -> SavedScores:
    """Read the ``scores.jsonl`` of an earlier ``rtkern calibrate`` run; ValueError naming ``file:line``
    on a malformed row (every row must name the same categories, in the same order)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such scores file (rtkern calibrate writes DIR/scores.jsonl)")
    prompts, labels, cats, srcs, rows = [], [], [], [], []
    names, has_respond = None, None
    for line, obj in _jsonl_objects(path):
        where = f"{path}:{line}"
        missing = [k for k in ("prompt", "should_refuse", "probs") if k not in obj]
        if missing:
            raise ValueError(f"{where}: missing field {missing[0]!r} (not a scores.jsonl of rtkern calibrate?)")
        probs = obj["probs"]
        if not isinstance(probs, dict) or not probs:
            raise ValueError(f"{where}: 'probs' must be an object of category name -> probability")
        if names is None:
            names, has_respond = list(probs), "respond" in obj
        if list(probs) != names or ("respond" in obj) != has_respond:
            raise ValueError(f"{where}: categories {list(probs)}{' + respond' * ('respond' in obj)} differ from "
                             f"the first row's {names}{' + respond' * has_respond}")
        values = list(probs.values()) + ([obj["respond"]] if has_respond else [])
        rows.append([_probability(v, where) for v in values])
        if not isinstance(obj["should_refuse"], bool):
            raise ValueError(f"{where}: 'should_refuse' must be true or false, got {obj['should_refuse']!r}")
        _add({"prompt": obj["prompt"], "label": obj["should_refuse"], "category": obj.get("category")}, where,
             prompts, labels, cats, srcs)
        srcs[-1] = obj.get("source") if isinstance(obj.get("source"), str) else where
    data = _finish(path, prompts, labels, cats, srcs)
    return SavedScores(data, np.array(rows, dtype=np.float32), names, bool(has_respond))


def _probability(v, where: str) -> float:
    # null: a NaN probability (an invalid row), refused later like a freshly scored one
    if v is None:
        return float("nan")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{where}: probabilities must be numbers in [0, 1] or null, got {v!r}")
    return float(v)
