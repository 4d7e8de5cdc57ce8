"""Refusal-token control inside Hugging Face transformers ``generate``.

    from rtkern.adapters.hf import RefusalLogitsProcessor
    proc = RefusalLogitsProcessor(spec, thresholds={"Humanizing requests": 1.1}, mode="category")
    out = model.generate(input_ids, logits_processor=[proc], max_new_tokens=64)
    proc.refusal_probs   # float32 [R, C], first generated position
    proc.refused         # int32 [R]: category, -1 answered, -2 invalid logits

`RefusalLogitsProcessor` is a ``transformers.LogitsProcessor``. On the first generated position it
rewrites the scores with `rtkern.apply_refusal_` (the fused Triton kernel on CUDA, the PyTorch
reference elsewhere), so whatever ``generate`` does next (greedy argmax or ``do_sample`` with
temperature / top-k / top-p) emits the decided token: the refusal token of the chosen category, or
``[respond]``, or, for a spec without ``[respond]``, any token except a refusal token. On every later
position it sets all control tokens to -inf. The refusal probabilities are computed at temperature 1
over the full vocabulary from the scores this processor receives: ``generate`` runs user processors
after its own score-changing processors (repetition penalty, ``bad_words_ids``, ...) and before the
sampling warpers (temperature, top-k, top-p), so with the default generation settings they are the
model's raw next-token logits.

Rows: ``generate`` calls the processor with one row per sequence, ``R = batch * num_return_sequences``
(``batch * num_beams`` in beam search), prompts repeat-interleaved, so per-prompt controls given for the
``batch`` prompts are repeated the same way (a ValueError if the rows are not such copies: one check,
which waits on the device, per ``generate`` call).
Beam search (``num_beams > 1``) passes log-softmaxed scores, whose softmax is the same distribution, so
the decision is the same and every beam starts with the decided token (the forced token adds log 1 = 0
to the beam score; the beams re-grow from the next position). Assisted / speculative generation and
continuous batching are not supported.

Prompts: the processor governs generated tokens only. A checkpoint's tokenizer holds the control tokens
as special tokens, and transformers turns special-token text in a prompt into their ids unless asked not
to: tokenize user text with ``tokenizer(text, split_special_tokens=True)`` (rtkern's own `Tokenizer` always
does), or a user who types ``[refuse]`` puts the control id in the prompt.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..sampler import apply_refusal_
from ..spec import RefusalControls, RefusalSpec
from ._common import PerCategory, per_category, per_row_modes, thresholds_and_mode

try:
    from transformers import LogitsProcessor as _Base
except ImportError:  # transformers is optional: the processor stays a plain callable
    _Base = object

__all__ = ["RefusalLogitsProcessor", "PENDING"]

PENDING = -3
"""``refused`` value of a ``free``-mode row until the processor sees the token the sampler drew."""

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class RefusalLogitsProcessor(_Base):
    """A ``transformers`` logits processor that takes the refusal decision at the first generated token.

    Parameters
    ----------
    spec : RefusalSpec
        The model's refusal token ids (C categories) and optional ``[respond]`` id.
    thresholds : float, sequence, mapping, torch.Tensor, or a thresholds file, default 0.5
        Refusal threshold per category: a scalar, ``[C]``, per prompt ``[B, C]``, a mapping from
        category name (``spec.names``) or index to value (unnamed categories keep 0.5), or a file from
        ``rtkern calibrate`` (its path, or `rtkern.thresholds.load_thresholds`'s result). A value above 1
        switches a category off. ``sum`` mode reads column 0.
    mode : str or sequence of str, optional
        ``"category"``, ``"sum"`` or ``"free"`` (README "Semantics"), for every prompt or one per prompt. None
        (default): the thresholds file's mode, else ``"category"``.
    logit_bias : float, sequence, mapping or torch.Tensor, default 0.0
        Added to each refusal token's logit before anything else; same forms as ``thresholds``
        (unnamed categories keep 0).
    prompt_length : int, optional
        Length of ``input_ids`` at the first generated position (the padded prompt length for
        decoder-only models, 1 for encoder-decoder models). None (default) detects it: a call starts a
        new generation when it is the processor's first, when the number of rows changes, when
        ``input_ids`` is not exactly one token longer than at the previous call (a new ``generate`` whose
        prompt extends the last conversation included), or when its first ``prompt_length`` tokens
        differ from that prompt (a comparison that waits on the device once per step).
    backend : {"triton", "torch", None}
        Passed to `apply_refusal_`; None picks Triton on CUDA (for V < 2**24) and the PyTorch
        reference otherwise.

    Attributes
    ----------
    refusal_probs : torch.Tensor or None
        float32 ``[R, C]``: softmax probability (temperature 1, bias applied) of each refusal token at
        the first generated position of the latest generation; NaN on invalid rows.
    refused : torch.Tensor or None
        int32 ``[R]``: category index, -1 not refusing, -2 invalid row (NaN/+inf scores: only the control
        tokens change, to -inf, so that none is ever drawn), ``PENDING`` (-3) for a ``free`` row until the next call shows which token
        was drawn (then its category or -1).
    forced_tokens : torch.Tensor or None
        int64 ``[R]``: the token forced at the first position, or -1 where the sampler chooses.
    prompt_length : int or None
        The prompt length of the latest generation.

    Notes
    -----
    The processor never writes to the ``scores`` it is given (``generate`` keeps that tensor for
    ``output_logits``); it returns a new tensor. One instance can serve successive ``generate`` calls;
    `reset` forgets the previous one explicitly.
    """

    # transformers' continuous-batching path calls processors on packed rows of many requests.
    supports_continuous_batching = False

    def __init__(self, spec: RefusalSpec, *, thresholds: PerCategory = 0.5, mode=None,
                 logit_bias: PerCategory = 0.0, prompt_length: Optional[int] = None,
                 backend: Optional[str] = None) -> None:
        if not isinstance(spec, RefusalSpec):
            raise TypeError(f"spec must be a RefusalSpec, got {type(spec).__name__}")
        if prompt_length is not None and (isinstance(prompt_length, bool) or not isinstance(prompt_length, int)
                                          or prompt_length < 1):
            raise ValueError(f"prompt_length must be a positive int or None, got {prompt_length!r}")
        if backend not in (None, "torch", "triton"):
            raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")
        C = spec.num_categories
        thresholds, mode = thresholds_and_mode(thresholds, mode)
        thr = per_category("thresholds", thresholds, spec, default=0.5)
        bias = per_category("logit_bias", logit_bias, spec, default=0.0)
        modes = per_row_modes(mode)
        n = self._rows_given(thr, bias, modes)
        # Validates shapes and values once, on the CPU; per-generation copies skip the checks.
        base = RefusalControls.build(n, C, "cpu", thresholds=thr, logit_bias=bias, mode=modes)
        self.spec = spec
        self.backend = backend
        self._fixed_prompt_length = prompt_length
        self._base = base
        self._has_free = bool((base.mode == 2).any())
        self._controls: dict[tuple[int, str], RefusalControls] = {}
        self._ids: dict[str, torch.Tensor] = {}
        self.reset()

    @staticmethod
    def _rows_given(thr, bias, modes) -> int:
        counts = {}
        for name, v in (("thresholds", thr), ("logit_bias", bias)):
            if isinstance(v, torch.Tensor) and v.dim() == 2:
                counts[name] = v.shape[0]
        if isinstance(modes, list):
            counts["mode"] = len(modes)
        if len(set(counts.values())) > 1:
            raise ValueError(f"per-prompt controls disagree on the number of prompts: {counts}")
        return next(iter(counts.values()), 1)

    def reset(self) -> None:
        """Forget the current generation and its records; the next call is a first generated position."""
        self._prompt: Optional[torch.Tensor] = None
        self._last_length: Optional[int] = None
        self._pending: Optional[torch.Tensor] = None
        self.prompt_length: Optional[int] = None
        self.refusal_probs: Optional[torch.Tensor] = None
        self.refused: Optional[torch.Tensor] = None
        self.forced_tokens: Optional[torch.Tensor] = None

    # -- per-call ----------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """Process one generation step.

        Parameters
        ----------
        input_ids : int64 [R, L]
            Prompt plus the tokens generated so far.
        scores : float [R, V]
            Next-token scores (float32 from ``generate``; bfloat16, float16 and float64 also accepted).

        Returns
        -------
        torch.Tensor
            New ``[R, V]`` scores, same dtype as ``scores``.
        """
        if not isinstance(input_ids, torch.Tensor) or not isinstance(scores, torch.Tensor):
            raise TypeError(f"input_ids and scores must be tensors, got {type(input_ids).__name__} and "
                            f"{type(scores).__name__}")
        if input_ids.dim() != 2 or scores.dim() != 2 or input_ids.shape[0] != scores.shape[0]:
            raise ValueError(f"expected input_ids [R, L] and scores [R, V] with the same R, got "
                             f"{list(input_ids.shape)} and {list(scores.shape)}")
        if not scores.is_floating_point():
            raise TypeError(f"scores must be floating point, got {scores.dtype}")
        self.spec.check_vocab(scores.shape[1])  # later positions only index_fill, which checks nothing
        starts = self._starts_generation(input_ids)
        self._last_length = input_ids.shape[1]
        if starts:
            return self._first_step(input_ids, scores)
        self._resolve_pending(input_ids)
        return scores.index_fill(1, self._control_ids(scores.device), float("-inf"))

    def _starts_generation(self, input_ids: torch.Tensor) -> bool:
        rows, length = input_ids.shape
        if self._fixed_prompt_length is not None:
            if length < self._fixed_prompt_length:
                raise ValueError(f"input_ids has {length} tokens, fewer than prompt_length="
                                 f"{self._fixed_prompt_length}")
            return length == self._fixed_prompt_length
        prompt = self._prompt
        if prompt is None or prompt.shape[0] != rows or length != self._last_length + 1:
            return True
        if prompt.device != input_ids.device:
            return True
        return not torch.equal(input_ids[:, : prompt.shape[1]], prompt)

    def _first_step(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows, length = input_ids.shape
        controls = self._controls_for(rows, scores.device)
        self._check_repeats(input_ids)
        work_dtype = scores.dtype if scores.dtype in _KERNEL_DTYPES else torch.float32
        # A private contiguous copy: apply_refusal_ rewrites in place, generate keeps `scores`.
        work = scores.to(dtype=work_dtype, memory_format=torch.contiguous_format, copy=True)
        res = apply_refusal_(work, self.spec, controls, backend=self.backend)
        free = controls.mode == 2
        self.refusal_probs = res.refusal_probs
        self.refused = torch.where(free & (res.refused != -2), PENDING, res.refused).to(torch.int32)
        self.forced_tokens = res.tokens
        self._pending = free & (res.refused != -2) if self._has_free else None
        self.prompt_length = length
        self._prompt = input_ids.detach().clone() if self._fixed_prompt_length is None else None
        return work if work.dtype == scores.dtype else work.to(scores.dtype)

    def _check_repeats(self, input_ids: torch.Tensor) -> None:
        # Per-prompt controls spread over num_return_sequences / beam copies must meet copies of one
        # prompt: a batch of distinct prompts that happens to be a multiple would take the wrong controls.
        # One comparison per generate call (it waits on the device), only when rows were expanded.
        n, rows = self._base.batch, input_ids.shape[0]
        if n == 1 or rows == n:
            return
        groups = input_ids.reshape(n, rows // n, -1)
        if not bool((groups == groups[:, :1]).all()):
            raise ValueError(f"generate passed {rows} rows that are not {rows // n} copies of each of the {n} "
                             f"prompts the per-prompt controls were given for; give controls for all {rows} "
                             "prompts")

    def _resolve_pending(self, input_ids: torch.Tensor) -> None:
        # free rows: the sampler chose; the token it drew is now at position prompt_length.
        if self._pending is None or self.prompt_length is None or input_ids.shape[1] <= self.prompt_length \
                or input_ids.shape[0] != self._pending.shape[0]:
            return
        rid = self._control_ids(input_ids.device)[: self.spec.num_categories]
        hit = input_ids[:, self.prompt_length, None] == rid[None, :]
        drawn = torch.where(hit.any(1), hit.int().argmax(1), -1).to(torch.int32)
        self.refused = torch.where(self._pending, drawn, self.refused)
        self._pending = None

    # -- cached tensors -----------------------------------------------------------------------------
    def _control_ids(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        t = self._ids.get(key)
        if t is None:
            t = self._ids[key] = torch.tensor(self.spec.control_ids, dtype=torch.long, device=device)
        return t

    def _controls_for(self, rows: int, device: torch.device) -> RefusalControls:
        key = (rows, str(device))
        c = self._controls.get(key)
        if c is not None:
            return c
        n = self._base.batch
        if n == 1:
            idx = torch.zeros(rows, dtype=torch.long)
        elif rows % n == 0:
            # generate repeat-interleaves prompts for num_return_sequences (and beams).
            idx = torch.arange(n).repeat_interleave(rows // n)
        else:
            raise ValueError(f"generate passed {rows} rows, not a multiple of the {n} prompts the per-prompt "
                             f"controls were given for")
        b = self._base
        zeros = torch.zeros(rows, dtype=torch.int64, device=device)
        c = RefusalControls(thresholds=b.thresholds[idx].to(device), logit_bias=b.logit_bias[idx].to(device),
                            mode=b.mode[idx].to(device), temperature=torch.ones(rows, device=device),
                            first_step=torch.ones(rows, dtype=torch.bool, device=device), seed=zeros,
                            position=zeros.clone())
        self._controls[key] = c
        return c

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(categories={list(self.spec.names)}, rows={self._base.batch}, "
                f"backend={self.backend!r}, prompt_length={self._fixed_prompt_length!r})")
