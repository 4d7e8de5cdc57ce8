"""The SFT training loop: completion-only chunked loss, AdamW, warmup + cosine, accumulation normalised
by the target tokens of the whole step, DDP or FSDP2 under torchrun, checkpoints with exact resume."""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .batching import Batch, RowStream, collate, count_targets, examples_digest, parse_mix
from .checkpoint import checkpoint_name, load_trainer_state, prune_checkpoints, save_checkpoint
from .config import TrainConfig
from .loss import chunked_cross_entropy
from .metrics import MetricsLog, peak_memory_gb, plot_loss

log = logging.getLogger("rtkern.train")


# -- distributed -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    """Rank and world size of this process (1 process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); a single process otherwise.

    NCCL when the device is CUDA, gloo on CPU. Each rank uses ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistInfo(rank, world, local)


# -- schedule and optimizer ------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup to ``cfg.lr``, then cosine decay to ``cfg.lr * cfg.min_lr_ratio`` at ``total_steps``."""
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total_steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    span = max(1, total_steps - warm)
    t = min(1.0, (step - warm) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, 1-D parameters (norm weights, biases) do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():      # named_parameters de-duplicates a tied head
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


# -- the loss module -------------------------------------------------------------------------------
class SFTModule(nn.Module):
    """Transformer + chunked completion-only loss in one forward, so DDP sees every parameter's use."""

    def __init__(self, model: nn.Module, ce_chunk: int = 1024):
        super().__init__()
        self.model, self.ce_chunk = model, ce_chunk

    def forward(self, tokens, positions, attn_mask, target_index, targets, target_weight=None) -> torch.Tensor:
        """Summed (weighted) cross-entropy over the target positions (divide by the step's target count)."""
        h = self.model(tokens, positions, attn_mask=attn_mask, return_hidden=True)
        h = h.reshape(-1, h.shape[-1]).index_select(0, target_index)
        return chunked_cross_entropy(h, self.model.lm_head.weight, targets, chunk=self.ce_chunk,
                                     token_weight=target_weight)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward (parameter names are unchanged)."""
    for layer in model.layers:
        if not getattr(layer, "_rtkern_ckpt", False):
            layer.forward = functools.partial(_checkpointed, type(layer).forward, layer)
            layer._rtkern_ckpt = True


def _checkpointed(forward, layer, *args):
    # A plain function that Dynamo traces into: `partial(checkpoint, layer.forward)` as the forward
    # would leave a compiled block with nothing traced (checkpoint itself is skipped), so it ran eager.
    from torch.utils.checkpoint import checkpoint
    return checkpoint(forward, layer, *args, use_reentrant=False)


def use_triton_kernels(model: nn.Module) -> None:
    """Run every RMSNorm and SwiGLU of ``model`` on rtkern's Triton forward/backward (names unchanged)."""
    from rtkern.kernels.rmsnorm import rms_norm
    from rtkern.kernels.swiglu import silu_mul
    for norm in [m for layer in model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)] \
            + [model.norm]:
        norm.forward = functools.partial(lambda n, x: rms_norm(x, n.weight.to(x.dtype), n.eps), norm)
    for layer in model.layers:
        mlp = layer.mlp
        mlp.forward = functools.partial(lambda m, x: m.down_proj(silu_mul(m.gate_proj(x), m.up_proj(x))), mlp)


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each block in place (regional: fast to compile, names unchanged)."""
    for layer in model.layers:
        layer.compile()


# -- FSDP2 -----------------------------------------------------------------------------------------
def shard_fsdp(module: SFTModule, device: torch.device, param_dtype: torch.dtype | None = None) -> None:
    """Shard ``module`` in place with FSDP2 over all ranks: each decoder layer, then the root.

    The root group holds what no layer owns (embedding, final norm, LM head), so the loss's direct use
    of ``lm_head.weight`` happens while the root's parameters are gathered. Parameters on another device
    (e.g. a model loaded on the CPU) are moved to ``device`` group by group, so the whole float32 model
    never sits on one GPU.

    Parameters
    ----------
    module : SFTModule
    device : torch.device
        The training device; its type names the device mesh (``cuda`` with NCCL, ``cpu`` with gloo).
    param_dtype : torch.dtype, optional
        Gather parameters in this dtype (bfloat16) for forward/backward; gradients are still reduced,
        and master weights and optimizer state kept, in float32. None: float32 throughout.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise ValueError("FSDP needs a process group: run under torchrun (init_distributed)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    reduce_dtype = torch.float32 if param_dtype is not None else None
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for layer in module.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(module, mesh=mesh, mp_policy=mp)


def optimizer_state_by_index(state: dict) -> dict:
    """A parameter-name-keyed optimizer state dict (``torch.distributed.checkpoint``) in the integer-keyed
    format of ``Optimizer.state_dict()``.

    ``Optimizer.state_dict`` numbers parameters across the param groups in order, and the named form
    lists them in that same order, so checkpoints stay one format whether or not FSDP wrote them.
    """
    index: dict[str, int] = {}
    groups = []
    for g in state["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in g["params"]]
        groups.append({**g, "params": ids})
    try:
        return {"state": {index[name]: v for name, v in state["state"].items()}, "param_groups": groups}
    except KeyError as e:
        raise ValueError(f"optimizer state for a parameter in no param group: {e}") from None


def optimizer_state_by_name(state: dict, names: list[str]) -> dict:
    """Inverse of `optimizer_state_by_index`: ``names[i]`` names parameter ``i`` (param-group order)."""
    n = sum(len(g["params"]) for g in state["param_groups"])
    if n != len(names):
        raise ValueError(f"optimizer state has {n} parameters, the model {len(names)}")
    return {"state": {names[int(i)]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}


# -- resume checks ---------------------------------------------------------------------------------
# Settings that fix which rows each step sees, and how many steps the run has (the LR schedule's length and
# where it stops): a resumed run must match them, or its step, epoch and data cursor would mean something
# else. Legitimately changeable on resume, so not listed: batch_size, grad_accum and the world size each on
# their own (only their product, the global batch, fixes a step's rows; how those rows are split into
# micro-batches and ranks changes float summation order only), and everything outside the data layout
# (device, dtype, kernels, parallel, save and log cadence, optimizer settings).
LAYOUT_FIELDS = ("seq_len", "packing", "mix", "epoch_examples", "seed", "epochs", "max_steps")


def layout_changes(then: dict, now: dict) -> list[str]:
    """``"key: OLD then, NEW now"`` for each layout entry (see `Trainer.data_layout`) that differs.

    ``examples`` (a digest of the tokenized examples) decides whether the data changed when both sides
    have it: the same examples read from moved or renamed files are the same rows. Keys missing on either
    side (a checkpoint from before a key was recorded) are not compared. ``total_steps`` is reported only
    when nothing else explains it (e.g. a data file whose content changed under an old checkpoint).
    """
    diffs = []
    for key in (*LAYOUT_FIELDS, "global_batch"):
        if key in then and key in now and then[key] != now[key]:
            diffs.append(f"{key}: {then[key]!r} then, {now[key]!r} now")
    if "examples" in then and "examples" in now:
        if then["examples"] != now["examples"]:
            diffs.append(f"data: the tokenized examples differ (files then {then.get('data')!r}, now "
                         f"{now.get('data')!r})")
    elif then.get("data") is not None and then.get("data") != now.get("data"):
        diffs.append(f"data: {then['data']!r} then, {now.get('data')!r} now")
    if not diffs and then.get("total_steps") not in (None, now.get("total_steps")):
        diffs.append(f"total_steps: {then['total_steps']!r} then, {now.get('total_steps')!r} now")
    return diffs


def _layout_fields(cfg: dict) -> dict:
    out = {k: cfg[k] for k in LAYOUT_FIELDS if k in cfg}
    if "mix" in out:
        w = parse_mix(out["mix"])
        out["mix"] = None if w is None else list(w)
    # settings that have no effect are not compared: epochs under max_steps, epoch_examples without a mix
    if out.get("max_steps") is not None and "epochs" in out:
        out["epochs"] = None
    if "mix" in out and out["mix"] is None and "epoch_examples" in out:
        out["epoch_examples"] = None
    return out


def _legacy_layout(st: dict) -> dict:
    # checkpoints written before "layout" was stored: what their config and world size say
    cfg = st.get("config", {})
    out = _layout_fields(cfg)
    if "data" in cfg:
        out["data"] = cfg["data"]
    if "batch_size" in cfg and "grad_accum" in cfg:
        out["global_batch"] = st.get("world_size", 1) * cfg["batch_size"] * cfg["grad_accum"]
    if "total_steps" in st:
        out["total_steps"] = st["total_steps"]
    return out


# -- the trainer -----------------------------------------------------------------------------------
class Trainer:
    """Runs SFT on tokenized examples.

    Parameters
    ----------
    cfg : TrainConfig
    model : rtkern.model.Transformer
        Float32 master weights on the training device; control tokens already added.
    tokenizer : rtkern.tokenizer.Tokenizer
    control : rtkern.train.prepare.ControlTokens
    examples : list of rtkern.train.data.Example
    dist_info : DistInfo, optional
        Under torchrun, from `init_distributed`.
    device : torch.device or str, optional
        Training device (default: where ``model`` is). Under FSDP the model may sit on the CPU: sharding
        moves it here piece by piece.
    """

    def __init__(self, cfg: TrainConfig, model, tokenizer, control, examples, *, dist_info: DistInfo | None = None,
                 device=None):
        self.cfg, self.model, self.tokenizer, self.control = cfg, model, tokenizer, control
        self.dist = dist_info or DistInfo()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.out = Path(cfg.out)
        torch.manual_seed(cfg.seed)
        self.stream = RowStream(examples, seq_len=cfg.seq_len, packing=cfg.packing, mix=parse_mix(cfg.mix),
                                epoch_examples=cfg.epoch_examples, seed=cfg.seed)
        self.examples_digest = examples_digest(examples)
        self.rows_per_step = cfg.batch_size * cfg.grad_accum * self.dist.world
        self.rows_per_epoch = len(self.stream.rows(0))
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.rows_per_epoch / self.rows_per_step))
        self.step = 0
        self.losses: list[tuple[int, float]] = []
        # the metrics window: what the steps since the last metrics record add up to (saved in checkpoints)
        self._win_loss: torch.Tensor | None = None      # this rank's summed loss
        self._win_tokens, self._win_targets, self._win_seconds = 0, 0, 0.0
        self._win_start: float | None = None            # perf_counter at the window's start, while training
        self.autocast_dtype = _autocast_dtype(cfg.dtype, self.device)
        model.train()
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        if cfg.compile:
            compile_blocks(model)
        if cfg.kernels == "triton":
            from rtkern.kernels._common import triton_runs_on
            if not triton_runs_on(self.device):
                raise ValueError(f"kernels='triton' trains on CUDA (or the CPU with TRITON_INTERPRET=1), "
                                 f"got device {self.device}")
            use_triton_kernels(model)
        self.module = SFTModule(model, cfg.ce_chunk)
        self.ddp = None
        self.fsdp = self.dist.world > 1 and cfg.parallel == "fsdp"
        if self.fsdp:
            shard_fsdp(self.module, self.device, self.autocast_dtype)
        else:
            model.to(self.device)
        if self.dist.world > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.module, device_ids=ids)
        if self.dist.is_main and self.dist.world > 1:
            log.info("%s over %d ranks", "FSDP2" if self.fsdp else "DDP", self.dist.world)
        elif cfg.parallel in ("ddp", "fsdp"):
            log.warning("parallel=%s: a single process has nothing to shard or replicate; training on one "
                        "device (launch with torchrun --nproc_per_node N for %s)", cfg.parallel, cfg.parallel.upper())
        self.optimizer = build_optimizer(model, cfg)     # after sharding: it must hold the sharded parameters
        self._stop_signal: int | None = None

    # -- state ---------------------------------------------------------------------------------
    def data_layout(self) -> dict:
        """What fixes the rows of each step and the run's length (checked on resume, see `layout_changes`)."""
        return {**_layout_fields(self.cfg.to_dict()), "data": list(self.cfg.data), "examples": self.examples_digest,
                "global_batch": self.rows_per_step, "total_steps": self.total_steps}

    def state(self, optimizer_state: dict | None = None, window_loss: torch.Tensor | None = None) -> tuple[dict, dict]:
        """(JSON state, tensors) for a resumable checkpoint.

        ``optimizer_state``: the whole optimizer state dict (default: this process's, which is the whole
        one except under FSDP; see `full_state_dicts`). ``window_loss``: the loss summed over all ranks
        since the last metrics record (default: this process's sum, which is the whole one in one process).
        """
        elapsed = self._win_seconds if self._win_start is None else time.perf_counter() - self._win_start
        st = {"step": self.step, "total_steps": self.total_steps, "data": self.stream.state_dict(),
              "world_size": self.dist.world, "layout": self.data_layout(), "config": self.cfg.to_dict(),
              "control": self.control.to_json(),
              "metrics_window": {"tokens": self._win_tokens, "target_tokens": self._win_targets,
                                 "seconds": elapsed}}
        if optimizer_state is None:
            optimizer_state = self.optimizer.state_dict()
        tensors = {"optimizer": optimizer_state, "rng_cpu": torch.get_rng_state()}
        window_loss = self._win_loss if window_loss is None else window_loss
        if window_loss is not None:
            tensors["window_loss"] = window_loss.detach().to("cpu").clone()
        if self.device.type == "cuda":
            tensors["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return st, tensors

    def load_state(self, path) -> None:
        """Restore optimizer, RNG, step, data position and the metrics window from a checkpoint written
        by `save`.

        The model weights come from the same checkpoint (load them before building the trainer).

        Raises
        ------
        ValueError
            When the data layout (`LAYOUT_FIELDS`, the global batch, the examples) differs from the
            checkpoint's; nothing is restored then.
        """
        st, tensors = load_trainer_state(path)
        diffs = layout_changes(st.get("layout") or _legacy_layout(st), self.data_layout())
        if diffs:
            raise ValueError(f"cannot resume from {path}: the data layout changed ({'; '.join(diffs)}). Resume "
                             "with the checkpoint's settings, or start a new run from it with --base "
                             f"{path} instead of --resume")
        self.load_optimizer_state(tensors["optimizer"])
        torch.set_rng_state(tensors["rng_cpu"])
        if "rng_cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng_cuda"], self.device)
        self.stream.load_state_dict(st["data"])
        self.step = int(st["step"])
        win = st.get("metrics_window", {})
        self._win_tokens, self._win_targets = win.get("tokens", 0), win.get("target_tokens", 0)
        self._win_seconds, self._win_start = float(win.get("seconds", 0.0)), None
        loss = tensors.get("window_loss")
        # the saved sum is over all ranks: one rank carries it, the log's all-reduce adds the others' new sums
        self._win_loss = loss.to(self.device) if loss is not None and self.dist.is_main else None

    def full_state_dicts(self, *, optimizer: bool = True) -> tuple[dict | None, dict | None]:
        """(model state dict, optimizer state dict), whole and in the single-process format.

        Under FSDP this gathers the shards to rank 0 on the CPU: every rank must call it, and ranks
        other than 0 get ``(None, None)``. ``optimizer=False``: the model only (optimizer part None).
        """
        if not self.fsdp:
            return self.model.state_dict(), self.optimizer.state_dict() if optimizer else None
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.module, options=opts)
        optim = get_optimizer_state_dict(self.module, self.optimizer, options=opts) if optimizer else None
        if not self.dist.is_main:
            return None, None
        # the gathered names are the SFTModule's ("model.layers.0..."); the checkpoint wants the model's
        weights = {k.removeprefix("model."): v for k, v in weights.items()}
        return weights, optimizer_state_by_index(optim) if optim is not None else None

    def load_optimizer_state(self, state: dict) -> None:
        """Load a whole optimizer state dict in the ``Optimizer.state_dict()`` format (sharded under FSDP)."""
        if not self.fsdp:
            self.optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        by_id = {id(p): name for name, p in self.module.named_parameters()}
        names = [by_id[id(p)] for g in self.optimizer.param_groups for p in g["params"]]
        set_optimizer_state_dict(self.module, self.optimizer, optimizer_state_by_name(state, names),
                                 options=StateDictOptions(full_state_dict=True))

    def save(self, *, final: bool = False) -> Path:
        """Checkpoint (rank 0 writes, others wait). ``final``: the model only, in ``out/final``."""
        path = self.out / ("final" if final else checkpoint_name(self.step))
        weights, optim = self.full_state_dicts(optimizer=not final)
        window_loss = None if final else self._global_window_loss()
        if self.dist.is_main:
            st, tensors = (None, None) if final else self.state(optim, window_loss)
            save_checkpoint(path, self.model, self.tokenizer, self.control, state=st, tensors=tensors,
                            state_dict=weights)
            if not final:
                prune_checkpoints(self.out, self.cfg.keep_last)
        if self.dist.world > 1:
            dist.barrier()
        return path

    def _global_window_loss(self) -> torch.Tensor | None:
        """The metrics window's loss summed over ranks (every rank must call it; None right after a log)."""
        if self._win_loss is None:
            return None
        loss = self._win_loss.detach().clone()
        if self.dist.world > 1:
            dist.all_reduce(loss)
        return loss

    # -- one optimizer step --------------------------------------------------------------------
    def micro_batches(self, rows) -> list[Batch]:
        """This rank's micro-batches of a step's rows.

        Rows are sorted by length (less padding), cut into ``batch_size`` groups, and dealt round-robin to
        the ranks; the union over ranks is the whole step whatever the world size.
        """
        order = sorted(range(len(rows)), key=lambda i: -sum(len(e.ids) for e in rows[i]))
        srt = [rows[i] for i in order]
        bs = self.cfg.batch_size
        groups = [srt[i:i + bs] for i in range(0, len(srt), bs)]
        mine = groups[self.dist.rank::self.dist.world]
        return [collate(g, packed=self.cfg.packing, pad_multiple=self.cfg.pad_multiple,
                        control_weight=self.cfg.control_weight) for g in mine]

    def train_step(self, rows) -> tuple[torch.Tensor, float, int, int]:
        """Forward/backward over the step's rows, clip, AdamW update.

        Returns (summed loss of this rank's micro-batches, grad norm, global target tokens, global tokens).
        """
        lr = lr_at(self.step, self.cfg, self.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loss_sum, n_targets, n_tokens = self.forward_backward(rows)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if self.fsdp:       # a replicated DTensor: the norm over all shards
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_sum, grad_norm, n_targets, n_tokens

    def forward_backward(self, rows) -> tuple[torch.Tensor, int, int]:
        """Accumulate into ``.grad`` the gradient of (summed loss over the step) / (step's target tokens).

        Returns (summed loss of this rank's micro-batches, global target tokens, global tokens).
        """
        n_targets = count_targets(rows, self.cfg.control_weight)
        n_tokens = sum(len(e.ids) for r in rows for e in r)
        batches = self.micro_batches(rows)
        # DDP averages gradients over ranks; scaling by world makes the result sum/n_targets overall.
        scale = self.dist.world / n_targets
        loss_sum = torch.zeros((), device=self.device)
        runner = self.ddp or self.module
        for i, b in enumerate(batches):
            b = b.to(self.device)
            with self._grad_sync(last=i == len(batches) - 1):
                with self._autocast():
                    loss = runner(b.tokens, b.positions, b.attn_mask, b.target_index, b.targets, b.target_weight)
                (loss * scale).backward()
            loss_sum += loss.detach()
        return loss_sum, n_targets, n_tokens

    def _grad_sync(self, *, last: bool):
        # Gradients are reduced once per step, after the last micro-batch (DDP: no_sync before it). FSDP
        # also keeps the gathered parameters through the accumulation, unless fsdp_accum_sync trades that
        # for a reduce-scatter per micro-batch and sharded gradients (the memory FSDP is there to save).
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        if self.fsdp and not self.cfg.fsdp_accum_sync:
            self.module.set_requires_gradient_sync(last)
            self.module.set_reshard_after_backward(last)
        return contextlib.nullcontext()

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- the loop ------------------------------------------------------------------------------
    def train(self) -> dict:
        """Train to ``total_steps`` (or until SIGTERM/SIGINT, which saves a resumable checkpoint).

        Returns
        -------
        dict
            ``status`` (``"completed"`` or ``"interrupted"``), ``step``, ``path`` (final directory or
            checkpoint), ``losses`` (``[(step, loss)]`` at the logged steps).
        """
        cfg = self.cfg
        metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=self.step) if self.dist.is_main else None
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(_json(self.cfg.to_dict()), encoding="utf-8")
        restore = self._install_signal_handlers()
        bar = _progress(self.total_steps, self.step, enabled=cfg.progress and self.dist.is_main)
        self._win_start = time.perf_counter() - self._win_seconds     # a resumed window keeps its time
        status, path = "completed", None
        try:
            while self.step < self.total_steps:
                rows = self.stream.take(self.rows_per_step)
                loss_sum, grad_norm, n_tgt, n_tok = self.train_step(rows)
                self._win_loss = loss_sum if self._win_loss is None else self._win_loss + loss_sum
                self._win_tokens, self._win_targets = self._win_tokens + n_tok, self._win_targets + n_tgt
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    rec = self._log(metrics, bar, self._win_loss, self._win_targets, grad_norm, self._win_tokens,
                                    time.perf_counter() - self._win_start)
                    self._win_loss, self._win_tokens, self._win_targets = None, 0, 0
                    self._win_start = time.perf_counter()
                    self.losses.append((self.step, rec["loss"]))
                if bar is not None:
                    bar.update(1)
                if self._should_stop():
                    path = self.save()
                    status = "interrupted"
                    break
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save()
            if status == "completed":
                path = self.save(final=True)
        finally:
            self._win_seconds = time.perf_counter() - self._win_start
            self._win_start = None
            if bar is not None:
                bar.close()
            restore()
        if self.dist.is_main and cfg.plot and status == "completed":
            plot_loss(self.out / "metrics.jsonl", self.out / "loss.png", title=f"rtkern train ({cfg.base})")
        return {"status": status, "step": self.step, "path": str(path), "losses": list(self.losses)}

    def _log(self, metrics, bar, loss_acc, n_tgt, grad_norm, n_tok, dt) -> dict:
        loss = loss_acc.detach().clone()
        if self.dist.world > 1:
            dist.all_reduce(loss)
        rec = {"step": self.step, "epoch": round(self.stream.epoch + self.stream.cursor / self.rows_per_epoch, 4),
               "loss": float(loss) / n_tgt, "lr": self.optimizer.param_groups[0]["lr"],
               "grad_norm": float(grad_norm), "tokens": n_tok, "target_tokens": n_tgt,
               "tokens_per_s": n_tok / max(dt, 1e-9), "peak_mem_gb": round(peak_memory_gb(self.device), 3)}
        if metrics is not None:
            metrics.write(rec)
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
        return rec

    # -- interruption --------------------------------------------------------------------------
    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask the loop to save a checkpoint and stop after the current step."""
        self._stop_signal = signum

    def _should_stop(self) -> bool:
        flag = self._stop_signal is not None
        if self.dist.world > 1:      # every rank must agree, or the next collective hangs
            t = torch.tensor([int(flag)], device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {}

        def handler(signum, frame):
            log.warning("signal %d: saving a checkpoint after this step (send again to abort)", signum)
            self.request_stop(signum)
            signal.signal(signum, previous[signum])      # a second signal acts as usual

        for s in (signal.SIGTERM, signal.SIGINT):
            previous[s] = signal.signal(s, handler)

        def restore():
            for s, h in previous.items():
                signal.signal(s, h)
        return restore


def _autocast_dtype(name: str, device: torch.device):
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp32": None}[name]


def _progress(total: int, initial: int, *, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _json(obj) -> str:
    import json
    return json.dumps(obj, indent=2) + "\n"
