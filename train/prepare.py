"""Model preparation: add the control tokens as special tokens and grow the embedding and head to match."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..spec import RESPOND_TOKEN, control_token_strings

VOCAB_MULTIPLE = 64


@dataclass(frozen=True)
class ControlTokens:
    """The control tokens a model was trained with (what ``rtkern.json`` records).

    Attributes
    ----------
    scheme : str
        ``"single"`` or ``"category"``.
    refusal_tokens, names : tuple of str
        Refusal token strings and their category names, in category order.
    refusal_ids : tuple of int
        Their vocabulary ids.
    respond_token : str
    respond_id : int
    """

    scheme: str
    refusal_tokens: tuple[str, ...]
    names: tuple[str, ...]
    refusal_ids: tuple[int, ...]
    respond_token: str
    respond_id: int

    def id_for(self, label: str) -> int:
        """Control id for a record label (a category name, ``"refuse"`` or ``"respond"``)."""
        if label == "respond":
            return self.respond_id
        if self.scheme == "single":
            return self.refusal_ids[0]
        if label not in self.names:
            raise ValueError(f"label {label!r} has no token in the category scheme (categories: "
                             f"{list(self.names)}); a refusal needs its category")
        return self.refusal_ids[self.names.index(label)]

    def to_json(self) -> dict:
        """The ``rtkern.json`` payload."""
        return {"format": "rtkern-control-tokens", "version": 1, "scheme": self.scheme,
                "refusal_tokens": list(self.refusal_tokens), "categories": list(self.names),
                "refusal_ids": list(self.refusal_ids), "respond_token": self.respond_token,
                "respond_id": self.respond_id, "position": "first assistant token"}

    @classmethod
    def from_json(cls, d: dict) -> "ControlTokens":
        try:
            return cls(d["scheme"], tuple(d["refusal_tokens"]), tuple(d["categories"]),
                       tuple(int(i) for i in d["refusal_ids"]), d["respond_token"], int(d["respond_id"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed rtkern.json: {e!r}") from e


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def add_control_tokens(model: nn.Module, tokenizer, scheme: str, *,
                       multiple: int = VOCAB_MULTIPLE) -> ControlTokens:
    """Register the scheme's control tokens as special tokens and resize the model to fit.

    Rows set to the mean of the rows ``[0, n)`` (``n``: the tokenizer's size before this call, i.e. the
    rows of the base's own tokens), in the embedding and, when untied, the head: the ids of newly added
    tokens, and the rows that growing the matrix to a multiple of ``multiple`` creates. Everything else
    keeps its values: the tokens' rows, the ids of tokens that were already special (a checkpoint of ours
    used as a base keeps its trained control rows), and the base's padding rows that no token uses
    (``[n, rows before)`` apart from ids given to new tokens): no input reaches them, and as head rows
    they keep the base's logits for ids it never predicts, which the mean would raise.

    Parameters
    ----------
    model : rtkern.model.Transformer
        Changed in place (``model.args.vocab_size`` too).
    tokenizer : rtkern.tokenizer.Tokenizer
        Changed in place.
    scheme : {"single", "category"}
    multiple : int
        The vocabulary is padded to a multiple of this (tensor-core friendly shapes).

    Returns
    -------
    ControlTokens
    """
    strings, names = control_token_strings(scheme)
    trained_rows = tokenizer.vocab_size
    if trained_rows > model.embed_tokens.num_embeddings:
        raise ValueError(f"tokenizer has {trained_rows} ids but the model only {model.embed_tokens.num_embeddings} "
                         "embedding rows")
    before = set(tokenizer.get_vocab().values())
    ids = tokenizer.add_control_tokens(strings + [RESPOND_TOKEN])
    new_ids = sorted(set(ids) - before)
    size = round_up(max(tokenizer.vocab_size, model.embed_tokens.num_embeddings), multiple)
    # rows past the current matrix are new memory and must be set even when no token is new; the base's
    # unused rows in [trained_rows, current rows) keep their values unless a new token takes their id
    fresh = new_ids + list(range(model.embed_tokens.num_embeddings, size))
    resize_vocab(model, size, init_rows=fresh, mean_rows=trained_rows)
    return ControlTokens(scheme, tuple(strings), tuple(names), tuple(ids[:-1]), RESPOND_TOKEN, ids[-1])


@torch.no_grad()
def resize_vocab(model: nn.Module, size: int, *, init_rows=(), mean_rows: int | None = None) -> None:
    """Resize embedding and head to ``size`` rows (tied or untied), setting ``init_rows`` to the mean.

    Parameters
    ----------
    model : rtkern.model.Transformer
    size : int
        New number of rows (>= the current one).
    init_rows : iterable of int
        Rows to (re)initialise, e.g. new token ids.
    mean_rows : int, optional
        The mean is taken over rows ``[0, mean_rows)`` (default: all current rows).
    """
    old = model.embed_tokens.num_embeddings
    if size < old:
        raise ValueError(f"cannot shrink the vocabulary from {old} to {size}")
    mean_rows = old if mean_rows is None else mean_rows
    init_rows = sorted(set(int(i) for i in init_rows))
    if init_rows and not 0 <= init_rows[0] <= init_rows[-1] < size:
        raise ValueError(f"init_rows must lie in [0, {size}), got {init_rows[0]}..{init_rows[-1]}")
    tied = model.lm_head.weight is model.embed_tokens.weight
    model.embed_tokens.weight = _grown(model.embed_tokens.weight, size, init_rows, mean_rows)
    model.embed_tokens.num_embeddings = size
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    else:
        model.lm_head.weight = _grown(model.lm_head.weight, size, init_rows, mean_rows)
    model.lm_head.out_features = size
    model.args = dataclasses.replace(model.args, vocab_size=size)


def _grown(w: torch.Tensor, size: int, init_rows, mean_rows: int) -> nn.Parameter:
    out = torch.empty(size, w.shape[1], dtype=w.dtype, device=w.device)
    out[:w.shape[0]] = w
    if init_rows:
        mean = w[:mean_rows].float().mean(0).to(w.dtype)
        out[torch.tensor(init_rows, device=w.device)] = mean
    return nn.Parameter(out, requires_grad=w.requires_grad)
