"""Scoring: the first-token probability of every control token, one batched prefill per chunk of prompts.

`score` is the one-call form; a `Scorer` keeps its state between calls, which matters with
``cuda_graphs=True``: each chunk is padded to ``batch_size`` rows and a multiple of ``bucket`` tokens and
replayed from a CUDA graph captured once per padded length, so a small model's prefill stops paying a
kernel launch per op from Python. Right padding never changes a real position's logits (causal
attention), so padded and unpadded scores are the same numbers up to the matmul's reduction order.
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence, Union

import torch

from .argtypes import positive_int
from .model import right_padded
from .sampler import refusal_probs
from .spec import RefusalSpec

Prompt = Union[str, Sequence[dict]]


def score(model: torch.nn.Module, tokenizer, prompts: Sequence[Prompt], spec: RefusalSpec, *,
          batch_size: int = 16, max_length: Optional[int] = None, progress: bool = True,
          cuda_graphs: bool = False) -> torch.Tensor:
    """First-token probabilities of every control token for each prompt.

    Each prompt (a user message string, or a list of chat messages) is rendered with the tokenizer's
    chat template and ``add_generation_prompt=True``, as generation does. Prompts are sorted by length
    into chunks of ``batch_size``, right-padded, and each chunk takes one forward pass; the logits are
    read at each row's last real position. Right padding under causal attention never reaches a real
    position, so the result does not depend on the batch composition.

    Parameters
    ----------
    model : rtkern.model.Transformer (or any module mapping int64 ``[B, T]`` to logits ``[B, T, V]``)
    tokenizer : rtkern.tokenizer.Tokenizer
    prompts : sequence of str or of message lists, length N
    spec : RefusalSpec
    batch_size : int
        Prompts per forward pass.
    max_length : int, optional
        Longest allowed rendered prompt (default: the model's ``max_position_embeddings`` when known).
        A longer prompt raises ValueError rather than being silently truncated.
    progress : bool
        Show a tqdm progress bar.
    cuda_graphs : bool
        Replay the forward passes from CUDA graphs (see `Scorer`; the captures are discarded on return,
        so keep a `Scorer` to score several prompt sets).

    Returns
    -------
    torch.Tensor
        float32 ``[N, C]`` on the CPU, or ``[N, C + 1]`` when the spec has ``[respond]`` (its
        probability is the last column). Softmax at temperature 1 over the full vocabulary, the same
        numbers as `rtkern.refusal_probs` on the generation logits.
    """
    scorer = Scorer(model, tokenizer, spec, batch_size=batch_size, max_length=max_length, cuda_graphs=cuda_graphs)
    return scorer(prompts, progress=progress)


class Scorer:
    """`score` with its settings and CUDA graphs kept between calls.

    Parameters
    ----------
    model, tokenizer, spec, batch_size, max_length
        As for `score`.
    cuda_graphs : bool
        Pad every chunk to ``batch_size`` rows and a multiple of ``bucket`` tokens and replay one CUDA
        graph per padded length (captured on first use). Needs the model on CUDA and a forward that
        never waits on the device (rtkern's `Transformer`; a module that reads values back cannot be
        captured).
    bucket : int, optional
        Pad each chunk to ``batch_size`` rows and its length to a multiple of this (default 32 with
        ``cuda_graphs``; without either, a chunk is as long as its longest prompt and no wider than its
        prompts). A larger bucket means fewer captures and more padding.

    Examples
    --------
    >>> scorer = Scorer(model, tok, spec, batch_size=64, cuda_graphs=True)
    >>> probs = scorer(prompts)          # captures a graph per padded length on the way
    >>> probs = scorer(other_prompts)    # replays them
    """

    def __init__(self, model: torch.nn.Module, tokenizer, spec: RefusalSpec, *, batch_size: int = 16,
                 max_length: Optional[int] = None, cuda_graphs: bool = False, bucket: Optional[int] = None):
        if not isinstance(spec, RefusalSpec):
            raise TypeError(f"spec must be a RefusalSpec, got {type(spec).__name__}")
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be a bool, got {cuda_graphs!r}")
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        if hasattr(tokenizer, "protect"):  # rtkern's Tokenizer: a prompt spelling "[refuse]" stays text
            tokenizer.protect(spec.control_ids)
        self.batch_size = positive_int(batch_size, "batch_size")
        self.max_length = _max_length(model, max_length)
        self.device = _device(model)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs the model on CUDA, got {self.device}")
        self.cuda_graphs = cuda_graphs
        self.bucket = positive_int(bucket, "bucket") if bucket is not None else (32 if cuda_graphs else None)
        vocab = _vocab_size(model)
        if vocab is not None:
            spec.check_vocab(vocab)
        # Every control token as a "refusal" column: one refusal_probs call gives [respond] as well.
        self._probe = RefusalSpec(spec.control_ids, None, [str(i) for i in spec.control_ids])
        self._graphs: dict[int, _ChunkGraph] = {}
        self._weights: tuple = ()
        self._pool = None

    def __call__(self, prompts: Sequence[Prompt], *, progress: bool = True) -> torch.Tensor:
        """Probabilities ``[N, len(spec.control_ids)]`` float32 on the CPU, as `score` returns them."""
        if isinstance(prompts, (str, bytes)):
            raise TypeError("prompts must be a sequence of prompts, got a single string")
        ids = _render_all(self.tokenizer, prompts)
        _check_lengths(ids, self.max_length)
        _check_no_cache(self.model)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        # Results stay on the device until the end: no per-chunk host sync, so the host runs ahead.
        out = torch.empty(len(ids), len(self.spec.control_ids), dtype=torch.float32, device=self.device)
        from tqdm.auto import tqdm
        with torch.inference_mode(), tqdm(total=len(ids), desc="scoring", unit="prompt", disable=not progress) as bar:
            self._forget_stale_graphs()
            for lo in range(0, len(order), self.batch_size):
                rows = [ids[i] for i in order[lo:lo + self.batch_size]]
                logits = self._last_logits(*self._pad(rows))[:len(rows)]
                out[lo:lo + len(rows)] = refusal_probs(logits.contiguous(), self._probe)
                bar.update(len(rows))
        result = torch.empty_like(out, device="cpu")
        result[torch.tensor(order, dtype=torch.int64)] = out.cpu()
        return result

    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(len(r) for r in rows)
        B = len(rows)
        if self.bucket is not None:
            T, B = -(-T // self.bucket) * self.bucket, self.batch_size
        tokens, last = right_padded(rows, B, T)
        return tokens.to(self.device), last.to(self.device)

    def _last_logits(self, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graphs:
            return last_position_logits(self.model, tokens, last)
        T = tokens.shape[1]
        if T not in self._graphs:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            self._graphs[T] = _ChunkGraph(self.model, tokens.shape[0], T, self._pool)
        return self._graphs[T].replay(tokens, last)

    def _forget_stale_graphs(self) -> None:
        # Graphs read the weights at the addresses they were captured with; new tensors need new graphs.
        weights = tuple(p.data_ptr() for p in self.model.parameters())
        if weights != self._weights:
            self._graphs, self._weights = {}, weights


class _ChunkGraph:
    """Static input buffers and the captured forward of one padded chunk shape ``[B, T]``."""

    def __init__(self, model: torch.nn.Module, B: int, T: int, pool):
        self.model = model
        self.tokens = torch.zeros(B, T, dtype=torch.int64, device=_device(model))
        self.last = torch.zeros(B, dtype=torch.int64, device=self.tokens.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # cuBLAS handles, SDPA kernel choice and lazy buffers: none may start in capture
                last_position_logits(model, self.tokens, self.last)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # One pool for all lengths: chunks replay one at a time, and each output is read before the next.
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = last_position_logits(model, self.tokens, self.last)

    def replay(self, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.last.copy_(last)
        self.graph.replay()
        return self.logits


def last_position_logits(model: torch.nn.Module, tokens: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Logits at one position per row.

    A model whose forward takes ``logits_index`` (rtkern's `Transformer`) runs the head on those
    positions only, as the engine's prefill does; any other module is run in full and indexed.

    Parameters
    ----------
    model : module mapping int64 ``[B, T]`` to logits ``[B, T, V]`` (or an object with ``.logits``)
    tokens : int64 ``[B, T]``
    last : int64 ``[B]``
        Position to read in each row.

    Returns
    -------
    torch.Tensor
        ``[B, V]`` in the model's dtype.
    """
    _check_no_cache(model)
    if _takes_logits_index(model):
        return model(tokens, logits_index=last)
    out = model(tokens)
    return getattr(out, "logits", out)[torch.arange(tokens.shape[0], device=tokens.device), last]


def _check_no_cache(model) -> None:
    if getattr(model, "max_seq", 0) > 0:
        # Scoring runs without a cache; with one the forward would overwrite (and be bounded by) it.
        raise ValueError("the model has a KV cache attached; call model.remove_cache() before scoring")


def _takes_logits_index(model) -> bool:
    try:
        return "logits_index" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _render_all(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    conversations = [_messages(p, i) for i, p in enumerate(prompts)]
    if hasattr(tokenizer, "apply_chat_template_batch"):  # rtkern's Tokenizer: one batched encode
        ids = [list(r) for r in tokenizer.apply_chat_template_batch(conversations, add_generation_prompt=True)]
    else:
        ids = [list(tokenizer.apply_chat_template(m, add_generation_prompt=True)) for m in conversations]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompt {i} rendered to no tokens")
    return ids


def _messages(prompt: Prompt, index: int) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt) and prompt:
        return list(prompt)
    raise TypeError(f"prompt {index} must be a string or a non-empty list of message dicts, "
                    f"got {type(prompt).__name__}")


def _max_length(model, max_length: Optional[int]) -> Optional[int]:
    if max_length is not None:
        return positive_int(max_length, "max_length")
    args = getattr(model, "args", None)
    return getattr(args, "max_position_embeddings", None)


def _check_lengths(ids: list[list[int]], max_length: Optional[int]) -> None:
    if max_length is None:
        return
    for i, row in enumerate(ids):
        if len(row) > max_length:
            raise ValueError(f"prompt {i} is {len(row)} tokens after the chat template, "
                             f"longer than max_length={max_length}")


def _vocab_size(model) -> Optional[int]:
    head = getattr(model, "lm_head", None)
    return head.weight.shape[0] if isinstance(head, torch.nn.Linear) else None


def _device(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
