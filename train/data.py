"""Training data: readers for the shared data files as they are, generic JSONL/CSV, the fixed CoCoNot
split, and tokenized examples with the control token as the first assistant token.

Every record carries a *label* (a CoCoNot category name, ``"refuse"`` for a refusal without a category,
or ``"respond"``) and a *pool* (``"refusal"``, ``"contrast"`` or ``"respond"``) that the mix ratios use.
Malformed rows raise `DataError` naming ``file:line``; well-formed rows that cannot train (a CoCoNot
prompt without a reference refusal) are skipped and listed in a warning, never dropped silently.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..spec import CATEGORIES

log = logging.getLogger("rtkern.train")

POOLS = ("refusal", "contrast", "respond")
IGNORE = -100
_ALIASES = {"unknowns": "Indeterminate requests"}   # CoCoNot's legacy name
_RESPOND_LABELS = {"", "respond", "[respond]", "none", "comply", "compliance", "benign"}
_REFUSE_LABELS = {"refuse", "[refuse]", "refusal", "noncompliance"}
_SHOWN_ERRORS = 10


class DataError(ValueError):
    """A malformed data file or row; the message names ``file:line``."""


@dataclass(frozen=True)
class Record:
    """One prompt/response pair before tokenization.

    Attributes
    ----------
    prompt, response : str
    label : str
        A name from ``rtkern.spec.CATEGORIES``, ``"refuse"`` or ``"respond"``.
    pool : str
        ``"refusal"``, ``"contrast"`` or ``"respond"`` (the mix ratios' groups).
    source : str
        ``file:line`` of the row.
    id : str, optional
    """

    prompt: str
    response: str
    label: str
    pool: str
    source: str = ""
    id: str | None = None


@dataclass
class ReadResult:
    records: list[Record] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)    # "file:line: reason"
    other_split: int = 0                                # CoCoNot rows left out by the requested split


# -- the fixed split -------------------------------------------------------------------------------
def coconot_split(example_id: str) -> str:
    """``"test"`` or ``"train"``: the fixed split of CoCoNot's original prompts (data README)."""
    if not isinstance(example_id, str) or not example_id:
        raise ValueError(f"a CoCoNot id must be a non-empty string, got {example_id!r}")
    return "test" if int(hashlib.sha256(example_id.encode()).hexdigest()[:8], 16) % 10 < 3 else "train"


def normalize_label(value) -> str:
    """Map a category column value to a record label; raises ValueError for unknown values."""
    if value is None:
        return "respond"
    if not isinstance(value, str):
        raise ValueError(f"category must be a string, got {type(value).__name__}")
    v = value.strip()
    if v.startswith("[") and v.endswith("]"):
        v = v[1:-1].strip()
    low = v.lower()
    if low in _RESPOND_LABELS:
        return "respond"
    if low in _REFUSE_LABELS:
        return "refuse"
    if low in _ALIASES:
        return _ALIASES[low]
    for c in CATEGORIES:
        if low == c.lower():
            return c
    raise ValueError(f"unknown category {value!r} (expected one of {list(CATEGORIES)}, 'refuse' or 'respond')")


# -- raw rows with line numbers --------------------------------------------------------------------
def iter_rows(path) -> Iterator[tuple[int, object]]:
    """Yield ``(line, row)`` from a ``.jsonl``, ``.json`` (array of objects) or ``.csv`` file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from iter_jsonl(path)
    elif suffix == ".json":
        yield from _iter_json_array(path)
    elif suffix in (".csv", ".tsv"):
        yield from _iter_csv(path, "\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .csv)")


@contextmanager
def open_utf8(path, newline=None):
    """Open a text file as UTF-8 (a leading BOM is dropped); bytes that are not UTF-8 raise DataError
    naming the file and the byte offset, wherever in the ``with`` body the file is read."""
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as fh:
            yield fh
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None


def not_utf8(path, err: UnicodeDecodeError) -> DataError:
    """DataError for a file that is not UTF-8, naming the first bad byte and its offset in the file."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        err = e  # offsets in the whole file; a text reader's error counts from its buffer
    at = err.start
    line = data.count(b"\n", 0, at) + 1
    return DataError(f"{path}: not UTF-8 text (byte 0x{err.object[at]:02x} at byte offset {at}, line {line}: "
                     f"{err.reason}); save the file as UTF-8")


def check_csv_header(path, header) -> None:
    """DataError naming ``file:1`` when a column name repeats (a row dict would keep only the last)."""
    repeated = [h for h, n in Counter(header).items() if n > 1]
    if repeated:
        raise DataError(f"{path}:1: header repeats column {repeated[0]!r} (columns: {list(header)}); "
                        "expected each column name once")


def iter_jsonl(path: Path):
    """(line number, decoded value) for each non-blank line; DataError names ``file:line`` on bad JSON."""
    with open_utf8(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None


def _iter_json_array(path: Path):
    with open_utf8(path) as fh:
        text = fh.read()
    dec = json.JSONDecoder()
    # Decode element by element so a bad element is reported at its own line.
    i = _skip_ws(text, 0)
    if i >= len(text) or text[i] != "[":
        raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: expected a JSON array of objects")
    i = _skip_ws(text, i + 1)
    if i < len(text) and text[i] == "]":
        return
    while True:
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        yield line, obj
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
        elif i < len(text) and text[i] == "]":
            return
        else:
            raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: expected ',' or ']' in the JSON array")


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _iter_csv(path: Path, delimiter: str):
    with open_utf8(path, newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        if not reader.fieldnames:
            raise DataError(f"{path}:1: empty CSV file (expected a header with prompt,response[,category])")
        check_csv_header(path, reader.fieldnames)
        start = reader.line_num + 1
        for row in reader:
            if None in row:
                raise DataError(f"{path}:{start}: more fields than the header has")
            if any(v is None for v in row.values()):
                raise DataError(f"{path}:{start}: fewer fields than the header has")
            yield start, row
            start = reader.line_num + 1


# -- formats ---------------------------------------------------------------------------------------
def detect_format(row: dict) -> str:
    """Name the format of a row by its keys (see `read_file`)."""
    keys = set(row)
    if "instances" in keys and "instruction" in keys:
        return "self_instruct"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"instruction", "context", "response"} <= keys:
        return "dolly"
    if "prompt" in keys and "chosen" in keys:
        return "preference"
    if "messages" in keys:
        return "messages"
    if {"id", "prompt", "category", "response"} <= keys and ("subcategory" in keys or "is_refusal" in keys):
        return "coconot"
    if "prompt" in keys and "response" in keys:
        return "generic"
    raise ValueError(f"unrecognised row with fields {sorted(keys)} (expected prompt/response[/category], "
                     "Alpaca, Dolly, self-instruct, messages, CoCoNot or preference rows)")


def read_file(path, *, pool: str | None = None, split: str | None = None) -> ReadResult:
    """Read one data file into records.

    Formats (detected from the first row's fields; every row must match):

    - generic: ``prompt``, ``response``, optional ``category`` (a CoCoNot category, ``refuse`` or
      empty/``respond``); JSONL, JSON or CSV;
    - CoCoNot original prompts with reference refusals (``id``, ``category``, ``subcategory`` or
      ``is_refusal``, ``prompt``, ``response``): rows without a reference refusal are skipped and
      listed; with ``split`` only that part of the fixed split is kept (the count left out is logged);
    - preference (``prompt``, ``chosen`` as text or a message list; CoCoNot contrast training):
      pool ``contrast``, label ``respond``;
    - Alpaca (``instruction``, ``input``, ``output``), Dolly (``instruction``, ``context``,
      ``response``), self-instruct (``instruction``, ``instances``), chat ``messages`` (first user
      and assistant turns): pool ``respond``.

    Parameters
    ----------
    path : str or Path
    pool : str, optional
        Override the pool of every record (one of ``POOLS``).
    split : {None, "train", "test"}
        Which part of the fixed CoCoNot split to keep for CoCoNot-format files. The split is defined
        for the shipped original prompts only (`load_recipe` asks for it); the default None keeps
        every row, as a user's own file should.

    Raises
    ------
    DataError
        Listing ``file:line`` of every malformed row (the first few shown), or when no row can train.
    """
    path = Path(path)
    if pool is not None and pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if split not in ("train", "test", None):
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    result, errors, fmt = ReadResult(), [], None
    for line, row in iter_rows(path):
        where = f"{path}:{line}"
        try:
            if not isinstance(row, dict):
                raise ValueError(f"expected an object, got {type(row).__name__}")
            fmt = fmt or detect_format(row)
            rec = _PARSERS[fmt](row, where, split)
        except (ValueError, TypeError, KeyError) as e:
            errors.append(f"{where}: {_why(e)}")
            continue
        if isinstance(rec, str):
            result.skipped.append(f"{where}: {rec}")
        elif rec is None:
            result.other_split += 1
        else:
            result.records.append(rec if pool is None else _with_pool(rec, pool))
    if errors:
        more = f"\n  ... and {len(errors) - _SHOWN_ERRORS} more" if len(errors) > _SHOWN_ERRORS else ""
        raise DataError(f"{len(errors)} malformed row(s) in {path}:\n  " + "\n  ".join(errors[:_SHOWN_ERRORS]) + more)
    if result.other_split:
        log.info("%s: kept the %s part of the fixed CoCoNot split, left out %d row(s) of the other part",
                 path, split, result.other_split)
    if result.skipped:
        log.warning("%s: skipped %d row(s) that cannot train: %s", path, len(result.skipped),
                    "; ".join(result.skipped[:_SHOWN_ERRORS]) + (" ..." if len(result.skipped) > _SHOWN_ERRORS else ""))
    if not result.records:
        why = f" ({len(result.skipped)} skipped, see above)" if result.skipped else \
            f" (all {result.other_split} row(s) belong to the other part of the CoCoNot split)" \
            if result.other_split else ""
        raise DataError(f"{path}: no trainable rows{why}")
    return result


def _why(e: Exception) -> str:
    return f"missing field {e.args[0]!r}" if isinstance(e, KeyError) else str(e)


def _with_pool(rec: Record, pool: str) -> Record:
    return Record(rec.prompt, rec.response, rec.label, pool, rec.source, rec.id)


def _text(row: dict, key: str, *, allow_empty: bool = False) -> str:
    v = row[key]
    if not isinstance(v, str):
        raise TypeError(f"field {key!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise ValueError(f"field {key!r} is empty")
    return v


def _generic(row, where, split):
    label = normalize_label(row.get("category"))
    return Record(_text(row, "prompt"), _text(row, "response"), label,
                  "respond" if label == "respond" else "refusal", where, _opt_id(row))


def _coconot(row, where, split):
    # None (not a str): the row belongs to the other part of the requested split
    cid = row["id"]
    if not isinstance(cid, str) or not cid:
        raise ValueError(f"field 'id' must be a non-empty string, got {cid!r}")
    label = normalize_label(row["category"])
    if label == "respond":
        raise ValueError(f"CoCoNot row without a refusal category ({row['category']!r})")
    prompt = _text(row, "prompt")
    if split is not None and coconot_split(cid) != split:
        return None
    response = row["response"]
    if response is not None and not isinstance(response, str):
        raise TypeError(f"field 'response' must be a string or null, got {type(response).__name__}")
    if not response or not response.strip():
        return f"id {cid}: no reference response"
    if "is_refusal" in row and not row["is_refusal"]:
        # e.g. the legacy contrast eval file: CoCoNot categories, but answers that must not be refused
        return f"id {cid}: reference response is not a refusal (is_refusal={row['is_refusal']!r})"
    return Record(prompt, response, label, "refusal", where, cid)


def _preference(row, where, split):
    chosen = row["chosen"]
    if isinstance(chosen, list):
        response = _first_turn(chosen, "assistant")
    else:
        response = _text(row, "chosen")
    return Record(_text(row, "prompt"), response, "respond", "contrast", where, _opt_id(row))


def _instruction(row, where, context: str, response: str) -> Record:
    # Alpaca and Dolly differ only in field names: an instruction, optional context, an answer.
    ctx = row.get(context) or ""
    if not isinstance(ctx, str):
        raise TypeError(f"field {context!r} must be a string, got {type(ctx).__name__}")
    prompt = _text(row, "instruction") + (f"\n\n{ctx}" if ctx.strip() else "")
    return Record(prompt, _text(row, response), "respond", "respond", where, _opt_id(row))


def _alpaca(row, where, split):
    return _instruction(row, where, "input", "output")


def _dolly(row, where, split):
    return _instruction(row, where, "context", "response")


def _self_instruct(row, where, split):
    inst = row["instances"]
    if not isinstance(inst, list) or not inst or not isinstance(inst[0], dict):
        raise ValueError("field 'instances' must be a non-empty list of objects")
    # Seed tasks hold one instance each; the first is the task's canonical example.
    return _alpaca({"instruction": row["instruction"], "input": inst[0].get("input", ""),
                    "output": inst[0].get("output"), "id": row.get("id")}, where, split)


def _messages(row, where, split):
    msgs = row["messages"]
    if not isinstance(msgs, list):
        raise TypeError("field 'messages' must be a list")
    label = normalize_label(row.get("category"))
    return Record(_first_turn(msgs, "user"), _first_turn(msgs, "assistant"), label,
                  "respond" if label == "respond" else "refusal", where, _opt_id(row))


def _first_turn(msgs: list, role: str) -> str:
    for m in msgs:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError("messages must be objects with 'role' and 'content'")
        if m["role"] == role:
            return _text(m, "content")
    raise ValueError(f"no {role!r} message")


def _opt_id(row: dict):
    v = row.get("id", row.get("prompt_id"))
    return None if v is None else str(v)


_PARSERS = {"generic": _generic, "coconot": _coconot, "preference": _preference, "alpaca": _alpaca,
            "dolly": _dolly, "self_instruct": _self_instruct, "messages": _messages}


# -- the shared data folder ------------------------------------------------------------------------
RECIPE = (  # (path in the shared data folder, pool)
    ("coconot/legacy_cd0f9f5/coconot_evaluation.jsonl", "refusal"),
    ("coconot/coconot_pref.jsonl", "contrast"),
    ("alpaca-gpt4-demo-1k/alpaca_en_demo.json", "respond"),
    ("stanford-alpaca-seed/seed_tasks.jsonl", "respond"),
)
EVAL_FILES = {"original_test": "coconot/coconot_eval.jsonl", "contrast": "coconot/coconot_contrast_eval.jsonl"}


def load_recipe(data_dir) -> list[Record]:
    """Training records from a folder laid out like ``shared/data`` (its README's recipe).

    Refusals: the train part of the fixed split of CoCoNot's original prompts, with the reference
    refusals of the legacy file. Contrast: ``coconot_pref.jsonl`` ``chosen``. Respond: the Alpaca-GPT4
    demo and the Stanford Alpaca seed tasks. Any prompt that also appears in an evaluation set (held-out
    split, contrast eval) is dropped, so no evaluation prompt is ever trained on.
    """
    data_dir = Path(data_dir)
    records = []
    for rel, pool in RECIPE:
        records += read_file(data_dir / rel, pool=pool, split="train").records
    held_out = {r.prompt.strip() for recs in load_eval_sets(data_dir).values() for r in recs}
    kept = [r for r in records if r.prompt.strip() not in held_out]
    if len(kept) != len(records):
        log.warning("%s: dropped %d training record(s) whose prompt is in an evaluation set",
                    data_dir, len(records) - len(kept))
    return kept


def load_eval_sets(data_dir) -> dict[str, list[Record]]:
    """Evaluation prompts: ``original_test`` (held-out split, should refuse) and ``contrast`` (should answer)."""
    data_dir = Path(data_dir)
    out = {}
    for name, rel in EVAL_FILES.items():
        recs = []
        for line, row in iter_rows(data_dir / rel):
            where = f"{data_dir / rel}:{line}"
            try:
                if not isinstance(row, dict):
                    raise ValueError(f"expected an object, got {type(row).__name__}")
                if name == "original_test" and coconot_split(row["id"]) != "test":
                    continue
                label = normalize_label(row["category"]) if name == "original_test" else "respond"
                recs.append(Record(_text(row, "prompt"), "", label,
                                   "refusal" if name == "original_test" else "contrast", where, row["id"]))
            except (ValueError, TypeError, KeyError) as e:
                raise DataError(f"{where}: {_why(e)}") from None
        out[name] = recs
    return out


def load_data(specs) -> list[Record]:
    """Records from ``--data`` specs: a folder (the shared-data recipe) or ``FILE[@POOL]``.

    Only a folder's recipe applies the fixed CoCoNot split (to its shipped original prompts); a file
    keeps all its rows, whatever its format.
    """
    records = []
    for spec in specs:
        spec = str(spec)
        path, pool = spec, None
        head, sep, tail = spec.rpartition("@")
        if sep and tail in POOLS:
            path, pool = head, tail
        p = Path(path)
        if p.is_dir():
            if pool:
                raise ValueError(f"{spec}: a pool override applies to files, not folders")
            records += load_recipe(p)
        else:
            records += read_file(p, pool=pool).records
    if not records:
        raise DataError("no training records")
    return records


# -- tokenized examples ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """Token ids of one conversation; ``ids[n_prompt]`` is the control token.

    Positions ``>= n_prompt`` are trained (control token, response, end of turn); the rest are context.
    """

    ids: tuple[int, ...]
    n_prompt: int
    pool: str
    source: str = ""

    def labels(self) -> list[int]:
        """Per-token labels, Hugging Face style (unshifted): the id where trained, ``IGNORE`` elsewhere."""
        return [IGNORE] * self.n_prompt + list(self.ids[self.n_prompt:])


def build_example(tokenizer, record: Record, control_id: int, *, max_len: int | None = None) -> Example | None:
    """Tokenize a record with the tokenizer's chat template.

    The sequence is the rendered prompt up to the assistant header (``add_generation_prompt``, exactly
    what inference feeds), then the control token, then the response and the end-of-turn token. Longer
    than ``max_len``: the response is cut. Returns None (and logs) when even the prompt and the control
    token do not fit.
    """
    msgs = [{"role": "user", "content": record.prompt}]
    prompt_text = tokenizer.render_chat(msgs, add_generation_prompt=True)
    full_text = tokenizer.render_chat(msgs + [{"role": "assistant", "content": record.response}],
                                      add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(f"{record.source}: the chat template renders the prompt differently with and "
                         "without the assistant turn; cannot place the control token")
    tail = full_text[len(prompt_text):]
    body = record.response.strip()
    at = tail.find(body)
    if at < 0:
        raise ValueError(f"{record.source}: the chat template does not reproduce the response verbatim")
    end = tokenizer.encode(tail[at + len(body):])
    eos = set(tokenizer.eos_ids)
    cut = next((i for i, t in enumerate(end) if t in eos), None)
    if cut is None:
        raise ValueError("the chat template ends the assistant turn without an end-of-turn/EOS token")
    prompt_ids = tokenizer.encode(prompt_text)
    if not prompt_ids:
        raise ValueError("the chat template renders an empty prompt; the control token needs a position to "
                         "be predicted from")
    ids = prompt_ids + [control_id] + tokenizer.encode(tail[:at + len(body)]) + end[:cut + 1]
    if max_len is not None and len(ids) > max_len:
        if len(prompt_ids) + 1 > max_len:
            log.warning("%s: prompt (%d tokens) does not fit seq_len=%d; example skipped",
                        record.source, len(prompt_ids), max_len)
            return None
        ids = ids[:max_len]
    return Example(tuple(ids), len(prompt_ids), record.pool, record.source)


def build_examples(tokenizer, records, control, *, max_len: int | None = None) -> list[Example]:
    """`build_example` over records; ``control`` is a `rtkern.train.prepare.ControlTokens`."""
    out, records = [], list(records)
    for r in records:
        try:
            ex = build_example(tokenizer, r, control.id_for(r.label), max_len=max_len)
        except ValueError as e:
            msg = str(e) if not r.source or r.source in str(e) else f"{r.source}: {e}"
            raise DataError(msg) from None
        if ex is not None:
            out.append(ex)
    if len(out) < len(records):
        log.warning("skipped %d of %d record(s) whose prompt does not fit seq_len=%s (listed above)",
                    len(records) - len(out), len(records), max_len)
    if not out:
        raise DataError("no example fits the sequence length")
    return out
