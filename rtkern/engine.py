"""Generation engine: batched prefill, static KV cache, decode step replayed from a CUDA graph.

The fused refusal sampler runs inside the decode graph, so a step is one graph replay with no host
synchronisation; the host reads tokens back only every ``check_every`` steps (EOS and stop strings).

    engine = Engine(model, tokenizer, spec)
    [result] = engine.generate(["How do I pick a lock?"], SamplingParams(thresholds=0.3))
    result.text, result.category, result.refusal_probs
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Optional, Union

import torch

from . import fused_decode
from .argtypes import positive_int
from .adapters._common import per_category, thresholds_and_mode
from .kernels._common import INTERPRET_HINT, triton_runs_on
from .model import Transformer, right_padded
from .sampler import refusal_sample
from .spec import MODES, RefusalControls, RefusalSpec, SampleOutput

Prompt = Union[str, Sequence[int], Sequence[dict]]


@dataclass
class SamplingParams:
    """Per-request generation settings.

    thresholds : float, [C] sequence, {category name: float}, or a thresholds file (path or loaded
                 rtkern.thresholds.Thresholds)                   refusal threshold per category (>1: off)
    mode : "category" | "sum" | "free" | None                    first-token decision rule (README "Semantics", rule 2);
                                                                 None: the thresholds file's, else "category"
    temperature : float                                          0 = greedy
    logit_bias : float or [C] sequence                           added to the refusal tokens' logits
    seed : int                                                   with the position, keys every draw
    max_new_tokens : int                                         including the control token
    stop : sequence of str                                       stop strings (excluded from the text)
    ignore_eos : bool                                            run to max_new_tokens (benchmarks)
    """

    thresholds: Union[float, Sequence[float], dict] = 0.5
    mode: Optional[str] = None
    temperature: float = 0.0
    logit_bias: Union[float, Sequence[float]] = 0.0
    seed: int = 0
    max_new_tokens: int = 256
    stop: Sequence[str] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, Integral):
            raise TypeError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        self.max_new_tokens = int(self.max_new_tokens)
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, Sequence) or any(not isinstance(s, str) or not s for s in self.stop):
            raise TypeError(f"stop must be a sequence of non-empty strings, got {self.stop!r}")
        # Checked here, not left to float()/int() later: those would accept "0.7" and truncate a seed of 1.7.
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, Real):
            raise TypeError(f"temperature must be a real number, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if not -2**63 <= self.seed < 2**63:
            raise ValueError(f"seed must fit in int64, got {self.seed!r}")
        self.thresholds, self.mode = thresholds_and_mode(self.thresholds, self.mode)
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")


@dataclass
class GenerationResult:
    """One request's output.

    text : the answer, without control tokens and stop string
    tokens : generated ids, the control token (if any) first
    refused : category index, -1 answered, -2 invalid logits
    category : name of the refusal category, or None
    refusal_probs : {category name: first-token probability}
    finish_reason : "eos", "stop", "length" or "invalid"
    """

    text: str
    tokens: list[int]
    refused: int
    category: Optional[str]
    refusal_probs: dict[str, float] = field(default_factory=dict)
    finish_reason: str = "length"


def _bucket(n: int, max_batch: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(b, max_batch)


class Engine:
    """Batched generation with refusal control for an rtkern ``Transformer``.

    Parameters
    ----------
    model : rtkern.model.Transformer (eval mode; its device and dtype are used)
    tokenizer : rtkern.tokenizer.Tokenizer, or None (prompts are token ids; results carry no text)
    spec : RefusalSpec, or None to read the control tokens from the tokenizer (`RefusalSpec.find`: the
        scheme the checkpoint was trained with, else category, then single). The tokenizer is told to
        treat the spec's special tokens as control tokens, which text never produces.
    max_batch : largest batch per forward; bigger requests lists are run in chunks
    cuda_graphs : replay decode steps from CUDA graphs (default: on when the model is on CUDA)
    compile : run the decode step through ``torch.compile`` before capturing it
    check_every : decode steps between host reads of the generated tokens (EOS / stop strings)
    sampler_backend : ``"triton"``, ``"torch"`` or None (the sampler's default for the device)
    kernels : decode step on ``"torch"`` ops (the model's reference forward) or on rtkern's ``"triton"``
        kernels (rtkern.fused_decode: GEMMs with RMSNorm, SwiGLU and the residual add fused in, RoPE +
        cache write, split decode attention; on CPU only through the Triton interpreter)
    """

    def __init__(self, model, tokenizer, spec: Optional[RefusalSpec] = None, *, max_batch: int = 32,
                 cuda_graphs: Optional[bool] = None, compile: bool = False, check_every: int = 16,
                 sampler_backend: Optional[str] = None, kernels: str = "torch"):
        if not isinstance(model, Transformer):
            raise TypeError(f"model must be an rtkern.model.Transformer, got {type(model).__name__}")
        if spec is not None and not isinstance(spec, RefusalSpec):
            raise TypeError(f"spec must be a RefusalSpec or None, got {type(spec).__name__}")
        if spec is None and tokenizer is None:
            raise TypeError("without a tokenizer the engine cannot find the control tokens: pass spec=RefusalSpec(...)")
        positive_int(max_batch, "max_batch")
        positive_int(check_every, "check_every")
        for name, v in (("compile", compile), ("cuda_graphs", cuda_graphs)):
            if v is not None and not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, got {v!r}")
        if sampler_backend not in (None, "triton", "torch"):
            raise ValueError(f"sampler_backend must be 'triton', 'torch' or None, got {sampler_backend!r}")
        p = model.embed_tokens.weight
        self.model, self.tok, self.device = model.eval(), tokenizer, p.device
        self.spec = spec if spec is not None else _spec_from_tokenizer(tokenizer)
        self.spec.check_vocab(model.args.vocab_size)
        if tokenizer is not None:
            tokenizer.protect(self.spec.control_ids)  # prompt text spelling "[refuse]" stays text
        self.max_batch, self.check_every, self.backend = max_batch, check_every, sampler_backend
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs the model on CUDA, got {self.device}")
        self.kernels = _check_kernels(kernels, self.device, compile)
        self._step_fn = torch.compile(self._step, fullgraph=True, dynamic=False) if compile else self._step
        self._slots: dict[int, _DecodeSlot] = {}
        self._kv = None  # the cache our graphs were captured on; someone else may replace it

    # -- public -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 *, chat: bool = True) -> list[GenerationResult]:
        """Generate for each prompt (text rendered with the chat template when ``chat``, or token ids)."""
        if isinstance(prompts, (str, dict)):
            raise TypeError("prompts must be a list of prompts, got a single prompt; wrap it in a list")
        if not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
        params = _per_request(params, len(prompts))
        for p in {id(p): p for p in params}.values():
            _request_controls(p, self.spec)  # every request's values, before any batch runs
            if p.stop and self.tok is None:
                raise ValueError(f"stop strings {list(p.stop)} need a tokenizer to read the text, and this engine "
                                 "has none")
        ids = [self.encode(p, chat=chat) for p in prompts]
        empty = [i for i, x in enumerate(ids) if not x]
        if empty:
            raise ValueError(f"prompts {empty} encode to no tokens")
        out: list[GenerationResult] = []
        for lo in range(0, len(ids), self.max_batch):
            out += self._generate_batch(ids[lo:lo + self.max_batch], params[lo:lo + self.max_batch])
        return out

    def encode(self, prompt: Prompt, *, chat: bool = True) -> list[int]:
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
                raise TypeError(f"a tensor prompt must be a 1-D integer tensor of token ids, got {prompt.dtype} "
                                f"of shape {list(prompt.shape)}")
            prompt = prompt.tolist()
        if not isinstance(prompt, Sequence):
            raise TypeError(f"a prompt must be a string, a list of token ids or a list of chat messages, "
                            f"got {type(prompt).__name__}")
        if (isinstance(prompt, str) or prompt and isinstance(prompt[0], dict)) and self.tok is None:
            raise TypeError("this engine has no tokenizer: prompts must be token-id lists")
        if isinstance(prompt, str):
            msgs = [{"role": "user", "content": prompt}]
            return self.tok.apply_chat_template(msgs) if chat else self.tok.encode(prompt)
        if prompt and isinstance(prompt[0], dict):
            return self.tok.apply_chat_template(list(prompt))
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, Integral)]
        if bad:
            raise TypeError(f"token-id prompts must hold ints, got {bad[0]!r} ({type(bad[0]).__name__})")
        ids = [int(t) for t in prompt]
        if not ids or min(ids) < 0 or max(ids) >= self.model.args.vocab_size:
            raise ValueError(f"token-id prompts must be non-empty ids in [0, {self.model.args.vocab_size}), got {ids[:8]}...")
        return ids

    # -- batch ------------------------------------------------------------------------------------

    def _generate_batch(self, ids: list[list[int]], params: list[SamplingParams]) -> list[GenerationResult]:
        n, steps = len(ids), max(p.max_new_tokens for p in params)
        self._ensure_cache(max(len(x) + p.max_new_tokens for x, p in zip(ids, params)))
        slot = self._slot(_bucket(n, self.max_batch))
        slot.load(self, ids, params)
        first = self._prefill(slot, ids)
        gen = torch.empty(slot.batch, steps, dtype=torch.int64, device=self.device)
        gen[:, 0] = first.tokens
        done = _Tracker(self, ids, params, first)
        i = 1
        while i < steps and not done.all_done_at(i, gen):
            self._replay(slot)
            gen[:, i] = slot.out.tokens
            i += 1
        return done.results(gen[:, :i])

    def _prefill(self, slot: "_DecodeSlot", ids: list[list[int]]) -> SampleOutput:
        tokens, last = right_padded(ids, slot.batch, max(len(x) for x in ids))
        logits = self.model(tokens.to(self.device), logits_index=last.to(self.device))
        slot.controls.first_step.fill_(True)
        out = refusal_sample(logits, self.spec, slot.controls, backend=self.backend)
        slot.controls.first_step.fill_(False)
        slot.tokens.copy_(out.tokens.clamp(min=0))
        return out

    def _step(self, tokens, pos, controls, out):
        # Everything a step changes happens here, so that one graph replay is the whole step.
        # `tokens` sit at `pos`; the token sampled from them sits at pos + 1, which keys its randomness
        if self.kernels == "triton":
            logits = fused_decode.decode_step(self.model, tokens, pos)
        else:
            logits = self.model(tokens[:, None], pos[:, None])[:, -1]
        # a row past its own budget keeps stepping with the batch; hold it at the cache's last slot
        pos.add_(1).clamp_(max=self.model.max_seq - 1)
        controls.position.copy_(pos)
        refusal_sample(logits, self.spec, controls, out=out, backend=self.backend)
        # invalid rows give -1: feed a harmless id on; the tracker reports those rows as invalid
        tokens.copy_(out.tokens.clamp(min=0))

    def _replay(self, slot: "_DecodeSlot") -> None:
        if slot.graph is not None:
            slot.graph.replay()
        else:
            self._step_fn(slot.tokens, slot.pos, slot.controls, slot.out)

    # -- static state -----------------------------------------------------------------------------

    def _ensure_cache(self, need: int) -> None:
        if need > self.model.args.max_position_embeddings:
            raise ValueError(f"prompt + max_new_tokens = {need} exceeds the model's "
                             f"max_position_embeddings={self.model.args.max_position_embeddings}")
        kv = self.model.layers[0].self_attn.kv_cache
        if kv is not None and kv is self._kv and need <= self.model.max_seq:
            if self.kernels == "triton" and fused_decode.prepare(self.model):
                self._slots = {}  # someone replaced weights our graphs captured
            return
        # attention reads the whole static cache each step, so size it to the need (rounded) not the model max
        seq = min(-(-need // 256) * 256, self.model.args.max_position_embeddings)
        self.model.setup_cache(self.max_batch, max(seq, self.model.max_seq if kv is self._kv else 0))
        self._kv, self._slots = self.model.layers[0].self_attn.kv_cache, {}  # graphs captured the old cache
        if self.kernels == "triton":
            fused_decode.prepare(self.model)

    def _slot(self, batch: int) -> "_DecodeSlot":
        if batch not in self._slots:
            self._slots[batch] = _DecodeSlot(self, batch)
        return self._slots[batch]


def _check_kernels(kernels, device: torch.device, compile: bool) -> str:
    if kernels not in ("torch", "triton"):
        raise ValueError(f"kernels must be 'torch' or 'triton', got {kernels!r}")
    if kernels == "triton" and not triton_runs_on(device):
        raise ValueError(f"kernels='triton' needs a CUDA model or {INTERPRET_HINT}, got a model on {device}")
    if kernels == "triton" and compile:
        raise ValueError("compile=True applies to the torch decode step; with kernels='triton' the step is "
                         "already fused (pick one)")
    return kernels


class _DecodeSlot:
    """Static buffers (and the CUDA graph) of one batch-size bucket."""

    def __init__(self, engine: Engine, batch: int):
        dev, C = engine.device, engine.spec.num_categories
        self.batch = batch
        self.tokens = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.controls = RefusalControls.build(batch, C, dev, first_step=False)
        self.out = SampleOutput.empty(batch, C, dev)
        self.graph = _capture(engine, self) if engine.cuda_graphs else None

    def load(self, engine: Engine, ids: list[list[int]], params: list[SamplingParams]) -> None:
        pad = self.batch - len(ids)
        rows = params + [params[0]] * pad
        self.controls.update_(
            thresholds=torch.stack([_row("thresholds", p.thresholds, engine.spec, 0.5) for p in rows]),
            logit_bias=torch.stack([_row("logit_bias", p.logit_bias, engine.spec, 0.0) for p in rows]),
            mode=[p.mode for p in rows], temperature=[p.temperature for p in rows],
            seed=[p.seed for p in rows], position=[len(x) for x in ids] + [0] * pad)
        self.pos.copy_(self.controls.position)


def _capture(engine: Engine, slot: _DecodeSlot) -> "torch.cuda.CUDAGraph":
    args = (slot.tokens, slot.pos, slot.controls, slot.out)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up: Triton autotuning / torch.compile must not happen during capture
            engine._step_fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        engine._step_fn(*args)
    return graph


class _Tracker:
    """Host-side bookkeeping: EOS, stop strings and length limits, read every ``check_every`` steps."""

    def __init__(self, engine: Engine, ids, params, first: SampleOutput):
        self.engine, self.params, self.n = engine, params, len(ids)
        eos = engine.tok.eos_ids if engine.tok is not None else engine.model.args.eos_token_id
        self.eos = set(eos) if isinstance(eos, (list, tuple)) else {eos} - {None}
        self.refused = first.refused[:self.n].tolist()
        self.probs = first.refusal_probs[:self.n].float().cpu()

    def all_done_at(self, step: int, gen: torch.Tensor) -> bool:
        if step % self.engine.check_every:
            return False
        host = gen[:self.n, :step].tolist()
        return all(self._finish(b, row)[1] != "length" or len(row) >= p.max_new_tokens
                   for b, (row, p) in enumerate(zip(host, self.params)))

    def _finish(self, b: int, row: list[int]) -> tuple[list[int], str]:
        p = self.params[b]
        if self.refused[b] == -2:
            return [], "invalid"
        row = row[:p.max_new_tokens]
        for i, t in enumerate(row):
            if t < 0:
                return row[:i], "invalid"
            if t in self.eos and not p.ignore_eos:
                row, reason = row[:i + 1], "eos"
                break
        else:
            reason = "length"
        if p.stop and any(s in self._text(row) for s in p.stop):
            return row, "stop"
        return row, reason

    def _text(self, row: list[int]) -> str:
        if self.engine.tok is None:
            return ""
        control = set(self.engine.spec.control_ids)
        return self.engine.tok.decode([t for t in row if t not in control and t not in self.eos],
                                      skip_special_tokens=True)

    def results(self, gen: torch.Tensor) -> list[GenerationResult]:
        names = self.engine.spec.names
        out = []
        for b, row in enumerate(gen[:self.n].tolist()):
            row, reason = self._finish(b, row)
            text = self._text(row)
            if reason == "stop":
                text, row = _cut_at_stop(self, text, row, self.params[b].stop)
            c = self.refused[b]
            out.append(GenerationResult(text=text, tokens=row, refused=c, category=names[c] if c >= 0 else None,
                                        refusal_probs=dict(zip(names, self.probs[b].tolist())),
                                        finish_reason=reason))
        return out


def _cut_at_stop(tracker: _Tracker, text: str, row: list[int], stops) -> tuple[str, list[int]]:
    cut = min(i for i in (text.find(s) for s in stops) if i >= 0)
    for k in range(1, len(row) + 1):  # shortest token prefix whose text reaches the stop string
        if len(tracker._text(row[:k])) > cut and any(s in tracker._text(row[:k]) for s in stops):
            return text[:cut], row[:k]
    return text[:cut], row


def _per_request(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if not isinstance(params, Sequence) or not all(isinstance(p, SamplingParams) for p in params):
        raise TypeError(f"params must be one SamplingParams or a list of them, got {type(params).__name__}")
    params = list(params)
    if len(params) != n:
        raise ValueError(f"params must be one SamplingParams or a list of {n}, got {len(params)} items")
    return params


def _row(name: str, value, spec: RefusalSpec, default: float) -> torch.Tensor:
    t = torch.as_tensor(per_category(name, value, spec, default), dtype=torch.float64)
    C = spec.num_categories
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != C):
        raise ValueError(f"{name} of one request must be a number or a list of {C} (one per category in "
                         f"{list(spec.names)}), got shape {list(t.shape)}")
    return t.expand(C).clone()


def _request_controls(p: SamplingParams, spec: RefusalSpec) -> RefusalControls:
    return RefusalControls.build(1, spec.num_categories, thresholds=_row("thresholds", p.thresholds, spec, 0.5),
                                 logit_bias=_row("logit_bias", p.logit_bias, spec, 0.0), mode=p.mode,
                                 temperature=p.temperature, seed=p.seed)


def _spec_from_tokenizer(tok) -> RefusalSpec:
    try:
        return RefusalSpec.find(tok)
    except ValueError as e:
        raise ValueError(f"the tokenizer has no refusal control tokens; pass spec=RefusalSpec(...) "
                         f"explicitly ({e})") from None
