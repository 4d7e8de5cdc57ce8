"""`TrainConfig`: every knob of a training run, with ``key=value`` overrides and validation."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..argtypes import positive_int

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
PARALLEL_MODES = ("auto", "ddp", "fsdp")


@dataclass
class TrainConfig:
    """Configuration of one SFT run (CLI flags and ``--set key=value`` map onto these fields).

    Data: ``data`` lists folders laid out like ``shared/data`` (the README's recipe) and/or files,
    ``FILE[@refusal|contrast|respond]``. ``mix`` is ``"refusal:contrast:respond"`` weights (None: every
    example once per epoch). Batching: each optimizer step consumes ``batch_size * grad_accum *
    world_size`` rows of at most ``seq_len`` tokens (one example per row, or several with ``packing``).
    ``dtype`` is the autocast compute dtype (``auto``: bfloat16 on CUDA, float32 on CPU); master weights
    and optimizer state stay float32. Under torchrun, ``parallel`` picks DDP (``auto``/``ddp``: a full
    replica per rank) or FSDP2 (``fsdp``: parameters, gradients and optimizer state sharded over the ranks,
    for models that do not fit one GPU); one process ignores it. ``fsdp_accum_sync``: reduce-scatter
    after every micro-batch and keep only gradient shards (less memory, more communication) instead of
    accumulating full gradients until the step's last micro-batch. ``control_weight``: the loss weight of
    each example's control token (the refusal decision) relative to its response tokens; 1 is the paper's
    plain completion loss, and the loss stays a mean (divided by the summed weights). Every value must
    have its field's type (`check_type`; a JSON config gets no conversion) and ``device`` must exist here.
    """

    base: str = "smollm2-135m-instruct"
    data: list[str] = field(default_factory=list)
    out: str = "runs/sft"
    scheme: str = "category"
    mix: str | None = None
    epoch_examples: int | None = None
    seq_len: int = 1024
    batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    packing: bool = False
    dtype: str = "auto"
    activation_checkpointing: bool = False
    compile: bool = False
    kernels: str = "torch"
    ce_chunk: int = 1024
    control_weight: float = 1.0
    pad_multiple: int = 8
    seed: int = 0
    device: str | None = None
    parallel: str = "auto"
    fsdp_accum_sync: bool = False
    save_every: int = 0
    keep_last: int = 2
    log_every: int = 1
    progress: bool = True
    plot: bool = True
    resume: str | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on mistyped or out-of-range values (the message names the field)."""
        errors = []
        for f in dataclasses.fields(self):
            try:
                setattr(self, f.name, check_type(f.name, f.type, getattr(self, f.name)))
            except ValueError as e:
                errors.append(str(e))
        if errors:
            raise ValueError("; ".join(errors))
        if self.device is not None:
            check_device(self.device)
        if self.scheme not in ("single", "category"):
            raise ValueError(f"scheme must be 'single' or 'category', got {self.scheme!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            # fp16 would need loss scaling; bf16 has float32's range and needs none
            raise ValueError(f"dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        if self.kernels not in ("torch", "triton"):
            raise ValueError(f"kernels must be 'torch' or 'triton', got {self.kernels!r}")
        if self.kernels == "triton" and self.compile:
            raise ValueError("kernels='triton' and compile=True both replace the blocks' ops: pick one")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {self.parallel!r}")
        for name in ("seq_len", "batch_size", "grad_accum", "ce_chunk", "pad_multiple", "log_every"):
            positive_int(getattr(self, name), name)
        for name in ("max_steps", "epoch_examples", "warmup_steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {v!r}")
        if self.max_steps == 0:
            raise ValueError("max_steps must be positive (or None to train for `epochs`)")
        for name in ("save_every", "keep_last", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be positive, got {self.epochs!r}")
        for name in ("min_lr_ratio", "warmup_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if isinstance(self.control_weight, bool) or not isinstance(self.control_weight, (int, float)) \
                or not 0 < self.control_weight < float("inf"):
            raise ValueError(f"control_weight must be a positive finite number, got {self.control_weight!r}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise ValueError("weight_decay and grad_clip must be >= 0 and eps > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got ({self.beta1}, {self.beta2})")
        if self.mix is not None:
            from .batching import parse_mix
            parse_mix(self.mix)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}")
        return cls(**d)

    @classmethod
    def from_json(cls, path) -> "TrainConfig":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def with_overrides(self, items) -> "TrainConfig":
        """A copy with ``key=value`` strings applied (values parsed by the field's type)."""
        d = self.to_dict()
        types = {f.name: str(f.type) for f in dataclasses.fields(self)}
        for item in items:
            key, sep, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep:
                raise ValueError(f"override {item!r} is not key=value")
            if key not in types:
                raise ValueError(f"unknown config key {key!r} (known: {sorted(types)})")
            d[key] = _parse(key, types[key], raw.strip())
        return TrainConfig.from_dict(d)


def _parse(key: str, typ: str, raw: str):
    optional = "None" in typ
    if optional and raw.lower() in ("none", "null", ""):
        return None
    base = typ.replace("| None", "").strip()
    try:
        if base == "bool":
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError
        if base == "int":
            return int(raw)
        if base == "float":
            return float(raw)
        if base.startswith("list"):
            return [s for s in raw.split(",") if s]
    except ValueError:
        raise ValueError(f"{key}: cannot parse {raw!r} as {base}") from None
    return raw


_EXPECTED = {"bool": "true or false", "int": "an integer", "float": "a finite number", "str": "a string",
             "list[str]": "a list of strings"}


def check_type(key: str, annotation: str, value):
    """``value`` checked against a `TrainConfig` field's annotation (as written, e.g. ``"int | None"``).

    bool must be a real bool; int an int (not a bool); float a finite int or float (returned as float);
    str a str; ``list[str]`` a list of str; ``| None`` also allows None. Raises ValueError naming ``key``,
    what was expected and what came.
    """
    parts = [p.strip() for p in str(annotation).split("|")]
    optional = "None" in parts
    base = next(p for p in parts if p != "None")
    if value is None and optional:
        return None
    ok = {"bool": lambda v: isinstance(v, bool),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          "str": lambda v: isinstance(v, str),
          "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)}[base]
    if not ok(value):
        want = _EXPECTED[base] + (" or null" if optional else "")
        raise ValueError(f"{key} must be {want}, got {value!r} ({type(value).__name__})")
    return float(value) if base == "float" else value


def check_device(name: str) -> None:
    """ValueError naming --device when torch cannot parse ``name`` or it asks for CUDA that is not there."""
    import torch
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device torch knows (expected cpu, cuda or cuda:N)") from None
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available here (torch.cuda.is_available() is False); "
                         "use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
