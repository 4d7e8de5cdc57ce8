"""rtkern.train.trainer: loss falls, accumulation normalisation, packing, exact resume after SIGTERM,
schedule and config."""
import json
import math
import os
import re
import signal

import pytest
import torch
import torch.nn.functional as F

from rtkern.loader import load_model
from rtkern.train.batching import collate
from rtkern.train.checkpoint import list_checkpoints
from rtkern.train.config import TrainConfig
from rtkern.train.data import build_examples
from rtkern.train.prepare import add_control_tokens
from rtkern.train.run import build_trainer
from rtkern.train.trainer import SFTModule, Trainer, lr_at
from train_utils import make_base, one_thread, records, write_jsonl


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base"))


def _setup(base, tmp_path, n=24, tie=True, device="cpu", **cfg):
    if not tie:     # the shared base is tied
        base = make_base(tmp_path / "untied", tie=False)
    model, tok = load_model(base, device=device, dtype=torch.float32)
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    ctrl = add_control_tokens(model, tok, "category")
    exs = build_examples(tok, records(n), ctrl, max_len=cfg.get("seq_len", 256))
    defaults = dict(out=str(tmp_path / "run"), data=["unused"], progress=False, plot=False, seq_len=256,
                    lr=3e-3, warmup_steps=2, grad_clip=0.0)
    return Trainer(TrainConfig(**{**defaults, **cfg}), model, tok, ctrl, exs)


def test_tiny_model_loss_falls(base, tmp_path):
    tr = _setup(base, tmp_path, batch_size=4, max_steps=40, grad_clip=1.0, plot=True)
    res = tr.train()
    losses = [l for _, l in res["losses"]]
    assert res["status"] == "completed" and len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 41))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gb", "target_tokens"} <= set(recs[0])
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def _grads(tr, rows):
    tr.optimizer.zero_grad(set_to_none=True)
    loss_sum, n_tgt, _ = tr.forward_backward(rows)
    return loss_sum, n_tgt, {n: p.grad.to("cpu", copy=True) for n, p in tr.model.named_parameters()}


@pytest.mark.parametrize("cw", [1.0, 4.0])
def test_accumulation_equals_one_big_batch(base, tmp_path, cw):
    """Also with control_weight: the loss is the weighted mean over the whole window either way."""
    big = _setup(base, tmp_path, batch_size=8, grad_accum=1, control_weight=cw)
    acc = _setup(base, tmp_path, batch_size=2, grad_accum=4, control_weight=cw)
    rows = big.stream.take(8)
    assert len({sum(len(e.ids) - e.n_prompt for e in r) for r in rows}) > 1   # uneven targets per row
    l1, n1, g1 = _grads(big, rows)
    l2, n2, g2 = _grads(acc, rows)
    assert n1 == n2 == sum(len(e.ids) - e.n_prompt for r in rows for e in r) + (cw - 1) * 8
    assert len(acc.micro_batches(rows)) == 4
    torch.testing.assert_close(l1, l2)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-5, atol=1e-7)
    # and both equal the (weighted) mean over every target token of the window
    _check_per_example_reference(big.model, [r[0] for r in rows], cw, l1, n1, g1)
    if cw == 1.0:
        # averaging per-micro-batch means (the common mistake) gives a different objective on these rows
        with torch.no_grad():
            means = [acc.module(b.tokens, b.positions, b.attn_mask, b.target_index, b.targets) / len(b.targets)
                     for b in acc.micro_batches(rows)]
        assert not math.isclose(float(sum(means) / len(means)), float(l1 / n1), rel_tol=1e-3)
    else:
        # the weighting changes the gradient (the test can fail)
        _, _, g0 = _grads(_setup(base, tmp_path, batch_size=8), rows)
        assert not all(torch.allclose(g0[k], g1[k], rtol=1e-3) for k in g1)


def test_packed_accumulation_with_control_weight(base, tmp_path):
    """Packed rows hold several examples, each with its own control token: the denominator counts
    examples, not rows, and accumulation still equals one big batch equals the per-example reference."""
    cw = 4.0
    big = _setup(base, tmp_path, batch_size=6, grad_accum=1, packing=True, control_weight=cw)
    acc = _setup(base, tmp_path, batch_size=2, grad_accum=3, packing=True, control_weight=cw)
    rows = big.stream.take(6)
    exs = [e for r in rows for e in r]
    assert len(exs) > len(rows) and len({len(r) for r in rows}) > 1     # packed, unevenly
    l1, n1, g1 = _grads(big, rows)
    l2, n2, g2 = _grads(acc, rows)
    n_ref = sum(len(e.ids) - e.n_prompt for e in exs) + (cw - 1) * len(exs)   # one control token per example
    assert n1 == n2 == n_ref
    assert len(acc.micro_batches(rows)) == 3
    torch.testing.assert_close(l1, l2)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-5, atol=1e-7)
    # the weighted mean over every example's targets, each example run on its own
    _check_per_example_reference(big.model, exs, cw, l1, n_ref, g1)


def _check_per_example_reference(model, examples, cw, loss, n, grads):
    """``loss`` (a sum) and ``grads`` (of loss / n) equal running each example alone, its control token's
    loss weighted ``cw``."""
    model.zero_grad(set_to_none=True)
    ref = []
    for e in examples:
        logits = model(torch.tensor([e.ids]))[0, e.n_prompt - 1:-1]
        nll = F.cross_entropy(logits, torch.tensor(e.ids[e.n_prompt:]), reduction="none")
        ref.append(nll.sum() + (cw - 1) * nll[0])          # nll[0]: the control token
    total = torch.stack(ref).sum()
    torch.testing.assert_close(total.detach(), loss, rtol=1e-5, atol=1e-5)
    (total / n).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_packing_equals_unpacked(base, tmp_path, tie):
    tr = _setup(base, tmp_path, tie=tie)
    tr.model.double()       # float64, so that summation order cannot hide a real difference
    exs = [r[0] for r in tr.stream.take(5)]
    module = SFTModule(tr.model, ce_chunk=7)
    packed = collate([exs[:3], exs[3:]], packed=True)
    plain = collate([[e] for e in exs])
    assert packed.tokens.shape[0] == 2 and packed.positions[0, len(exs[0].ids)] == 0

    def run(b):
        tr.model.zero_grad(set_to_none=True)
        loss = module(b.tokens, b.positions, b.attn_mask, b.target_index, b.targets)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in tr.model.named_parameters()}

    lp, gp = run(packed)
    lu, gu = run(plain)
    torch.testing.assert_close(lp, lu, rtol=1e-10, atol=1e-10)
    for k in gp:
        torch.testing.assert_close(gp[k], gu[k], rtol=1e-9, atol=1e-12)
    # without the block mask and per-sequence positions the result differs (the test can fail)
    leaky, _ = run(collate([exs[:3], exs[3:]], packed=False))
    assert not torch.allclose(leaky, lu, rtol=1e-4)


def test_packed_training_runs(base, tmp_path):
    tr = _setup(base, tmp_path, batch_size=2, max_steps=3, packing=True, seq_len=200)
    assert tr.rows_per_epoch < 24
    assert tr.train()["status"] == "completed"


def test_sigterm_saves_and_resume_reproduces_losses_exactly(base, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": r.prompt, "response": r.response,
                                             "category": "" if r.label == "respond" else r.label}
                                            for r in records(20)])
    # CPU: bit-exactness is the CPU contract (GPU attention backward kernels may use atomics)
    common = dict(base=str(base), data=[str(data)], device="cpu", progress=False, plot=False, seq_len=256, batch_size=3,
                  grad_accum=2, max_steps=9, lr=3e-3, warmup_steps=2, save_every=4, keep_last=1)
    full = build_trainer(TrainConfig(out=str(tmp_path / "full"), **common), None).train()
    assert full["status"] == "completed"
    ref = [l for _, l in full["losses"]]

    original = signal.getsignal(signal.SIGTERM)
    cfg = TrainConfig(out=str(tmp_path / "cut"), **common)
    tr = build_trainer(cfg, None)
    step = tr.train_step

    def killing_step(rows):
        out = step(rows)
        if tr.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)       # the handler only sets a flag
        return out
    tr.train_step = killing_step
    cut = tr.train()
    assert cut["status"] == "interrupted" and cut["step"] == 6
    assert [c.name for c in list_checkpoints(tmp_path / "cut")] == ["checkpoint-0000006"]   # keep_last=1
    assert signal.getsignal(signal.SIGTERM) is original and not (tmp_path / "cut" / "final").exists()

    resumed = build_trainer(TrainConfig(out=str(tmp_path / "cut"), resume="auto", **common), None)
    assert resumed.step == 6
    rest = resumed.train()
    got = [l for _, l in cut["losses"]] + [l for _, l in rest["losses"]]
    assert got == ref                                  # bit-exact, not just close
    logged = [json.loads(l)["loss"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert logged == ref
    a = load_model(tmp_path / "full" / "final", device="cpu")[0].state_dict()
    b = load_model(tmp_path / "cut" / "final", device="cpu")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("option", ["activation_checkpointing", "compile"])
def test_memory_and_speed_options_keep_gradients(base, tmp_path, option):
    if option == "compile" and not torch.cuda.is_available():
        pytest.skip("torch.compile (inductor) takes minutes on a small CPU; checked where a GPU is present")
    ref = _setup(base, tmp_path)
    rows = ref.stream.take(4)
    _, _, g_ref = _grads(ref, rows)
    # compile runs only where a GPU is present, and is checked there on it (inductor's CUDA code)
    opt = _setup(base, tmp_path, device="cuda" if option == "compile" else "cpu", **{option: True})
    names = [n for n, _ in opt.model.named_parameters()]
    assert names == list(g_ref)                           # checkpoints keep the same parameter names
    calls = []
    opt.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    _, _, g = _grads(opt, rows)
    if option == "activation_checkpointing":
        assert len(calls) == 2                            # the layer ran again in the backward
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-4, atol=1e-6)


def test_compile_traces_checkpointed_blocks(base, tmp_path, monkeypatch):
    # Dynamo skips torch.utils.checkpoint when it is itself the forward: the blocks then ran eager,
    # silently. The graph-counting backend stands in for inductor (minutes of CPU codegen).
    graphs, compile_ = [], torch.nn.Module.compile

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ref = _setup(base, tmp_path)
    rows = ref.stream.take(4)
    _, _, g_ref = _grads(ref, rows)
    torch._dynamo.reset()
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend=count, **kw))
    opt = _setup(base, tmp_path, activation_checkpointing=True, compile=True)
    _, _, g = _grads(opt, rows)
    assert graphs, "the compiled blocks traced nothing"
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-4, atol=1e-6)


def test_parallel_on_one_process_says_it_is_not_used(base, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="rtkern.train"):
        tr = _setup(base, tmp_path, parallel="fsdp")
    assert not tr.fsdp and tr.ddp is None
    assert "parallel=fsdp: a single process has nothing to shard" in caplog.text


def test_bf16_autocast_close_to_fp32(base, tmp_path):
    ref = _setup(base, tmp_path)
    rows = ref.stream.take(4)
    l32, n, _ = _grads(ref, rows)
    bf = _setup(base, tmp_path, dtype="bf16")
    l16, _, g = _grads(bf, rows)
    assert all(v.dtype == torch.float32 for v in g.values())        # master weights stay float32
    assert float(l16) != float(l32)                                  # bf16 did run
    assert abs(float(l16) - float(l32)) / float(l32) < 0.02


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 14) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert math.isclose(lr_at(14, cfg, 14), 0.1) and math.isclose(lr_at(9, cfg, 14), 0.55)


def test_lr_schedule_floor_scales_with_lr_and_warmup_settings():
    cfg = TrainConfig(lr=2e-3, warmup_steps=0, warmup_ratio=0.5, min_lr_ratio=0.25)
    # warmup_steps wins over warmup_ratio, even when it is 0: the first step runs at the peak
    assert lr_at(0, cfg, 10) == 2e-3
    # the floor is lr * min_lr_ratio (lr=1 in test_lr_schedule could not tell it from min_lr_ratio)
    assert math.isclose(lr_at(5, cfg, 10), 5e-4 + 1.5e-3 / 2) and math.isclose(lr_at(10, cfg, 10), 5e-4)
    # cosine, not linear (they agree at the midpoint): 2 steps of 10, 5e-4 + 1.5e-3 * (1 + cos(pi / 5)) / 2
    assert math.isclose(lr_at(2, cfg, 10), 1.8567627457812106e-3, rel_tol=1e-12)
    assert lr_at(12, cfg, 10) == lr_at(10, cfg, 10)          # past the end it stays at the floor
    # no warmup_steps: warmup_ratio of the run, rounded to the nearest step (0.25 * 14 = 3.5 -> 4)
    cfg = TrainConfig(lr=2e-3, warmup_ratio=0.25)
    assert [lr_at(s, cfg, 14) for s in range(5)] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3], rel=1e-12)
    # the documented defaults (--help: "default 3% of the run", control weight "default 1")
    assert TrainConfig().warmup_steps is None and TrainConfig().warmup_ratio == 0.03
    assert TrainConfig().control_weight == 1.0
    assert TrainConfig().grad_clip == 1.0                    # clipped at 1 like transformers' max_grad_norm


def _spy_optimizer(tr):
    """Record, at every optimizer step, each param group's lr and the norm of the gradients it applies."""
    seen, step = [], tr.optimizer.step

    def spy(*args, **kwargs):
        grads = [p.grad for g in tr.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        seen.append(([g["lr"] for g in tr.optimizer.param_groups], float(norm)))
        return step(*args, **kwargs)
    tr.optimizer.step = spy
    return seen


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_train_step_clips_the_global_grad_norm(base, tmp_path, clip):
    """The optimizer applies gradients of norm min(norm, grad_clip) (0: no clipping); train_step returns
    the norm before clipping (what the metrics log). Adam is nearly scale-invariant, so no loss curve
    would show clipping: the gradients are looked at where the optimizer reads them."""
    ref = _setup(base, tmp_path)
    rows = ref.stream.take(4)
    _, _, g = _grads(ref, rows)
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in g.values()])))
    assert norm > 2 * 0.05                                   # clipping at 0.05 does act
    tr = _setup(base, tmp_path, grad_clip=clip)
    seen = _spy_optimizer(tr)
    _, got, _, _ = tr.train_step(rows)
    assert float(got) == pytest.approx(norm, rel=1e-5)
    assert seen[0][1] == pytest.approx(min(norm, clip or float("inf")), rel=1e-5)


def test_lr_per_step_and_metrics_windows(base, tmp_path):
    """Every param group (decayed or not) runs at lr_at(step) for the step being taken; with log_every=3
    and 4 steps the records are at steps 3 and 4 (the last, partial window is logged too), each with
    its window's target tokens and the lr of its last step."""
    cfg = dict(batch_size=2, max_steps=4, warmup_steps=2, log_every=3)
    first = _setup(base, tmp_path, **cfg)
    rows = [first.stream.take(2) for _ in range(4)]          # the rows train() takes (same seed)
    tr = _setup(base, tmp_path, **cfg)
    seen = _spy_optimizer(tr)
    tr.train()
    want = [lr_at(s, tr.cfg, 4) for s in range(4)]           # 1.5e-3, 3e-3, 3e-3, 1.65e-3
    assert [lrs for lrs, _ in seen] == [[w, w] for w in want]
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [3, 4]
    assert [r["lr"] for r in recs] == [want[2], want[3]]
    n = [sum(len(e.ids) - e.n_prompt for r in step for e in r) for step in rows]
    assert [r["target_tokens"] for r in recs] == [n[0] + n[1] + n[2], n[3]]


def test_logged_loss_and_grad_norm_of_the_first_step(base, tmp_path):
    """The logged loss is the mean over the step's target tokens and the logged grad norm the norm before
    clipping, both against a per-example reference on the initial weights."""
    ref = _setup(base, tmp_path, batch_size=4)
    rows = ref.stream.take(4)
    _, n, g = _grads(ref, rows)
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in g.values()])))
    with torch.no_grad():
        total = sum(F.cross_entropy(ref.model(torch.tensor([e.ids]))[0, e.n_prompt - 1:-1],
                                    torch.tensor(e.ids[e.n_prompt:]), reduction="sum") for r in rows for e in r)
    tr = _setup(base, tmp_path, batch_size=4, max_steps=1, grad_clip=0.05)
    tr.train()
    (rec,) = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rec["target_tokens"] == n and rec["loss"] == pytest.approx(float(total) / n, rel=1e-5)
    assert norm > 0.05 and rec["grad_norm"] == pytest.approx(norm, rel=1e-5)


def test_total_steps_cover_every_row_of_the_epochs(base, tmp_path):
    # without max_steps the run takes ceil(epochs * rows / rows_per_step) steps: a last, partial step is
    # not dropped (10 rows, 4 per step: 3 steps)
    tr = _setup(base, tmp_path, n=10, batch_size=4)
    assert tr.rows_per_epoch == 10 and tr.total_steps == 3
    assert _setup(base, tmp_path, n=10, batch_size=4, epochs=0.5).total_steps == 2
    assert _setup(base, tmp_path, n=10, batch_size=2, grad_accum=2, epochs=1.5).total_steps == 4   # 3.75


def test_no_decay_on_1d_params(base, tmp_path):
    tr = _setup(base, tmp_path, weight_decay=0.1, beta1=0.8, beta2=0.99, eps=1e-6)
    decay, no_decay = tr.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6 for g in (decay, no_decay))
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(1 for _ in tr.model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n


def test_config_overrides_and_validation(tmp_path):
    cfg = TrainConfig().with_overrides(["lr=5e-5", "packing=true", "max_steps=none", "data=a,b", "mix=1:1:2",
                                      "control_weight=3"])
    assert cfg.control_weight == 3.0 and cfg.lr == 5e-5 and cfg.packing is True and cfg.max_steps is None and cfg.data == ["a", "b"]
    for bad in (["lr=-1"], ["nope=1"], ["packing=maybe"], ["batch_size=0"], ["scheme=both"], ["mix=1:1"], ["lr"],
                ["control_weight=0"], ["control_weight=inf"], ["max_steps=0"], ["min_lr_ratio=1.5"],
                ["warmup_ratio=-0.1"], ["grad_clip=-1"], ["beta2=1"], ["eps=0"]):
        with pytest.raises(ValueError):
            TrainConfig().with_overrides(bad)
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"lr": 1e-3, "seq_len": 64}))
    assert TrainConfig.from_json(p).seq_len == 64
    p.write_text(json.dumps({"learning_rate": 1e-3}))
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_json(p)


@pytest.mark.parametrize("key, value, want", [
    ("packing", "false", "packing must be true or false, got 'false' (str)"),
    ("lr", "1e-3", "lr must be a finite number, got '1e-3' (str)"),
    ("out", None, "out must be a string, got None"),
    ("seq_len", 64.0, "seq_len must be an integer, got 64.0 (float)"),
    ("batch_size", True, "batch_size must be an integer, got True (bool)"),
    ("max_steps", "10", "max_steps must be an integer or null, got '10'"),
    ("weight_decay", False, "weight_decay must be a finite number, got False (bool)"),
    ("data", "a.jsonl", "data must be a list of strings"),
    ("data", ["a", 1], "data must be a list of strings"),
    ("mix", [1, 1, 2], "mix must be a string or null"),
    ("epochs", float("inf"), "epochs must be a finite number, got inf"),
    ("lr", float("inf"), "lr must be a finite number, got inf"),
    ("weight_decay", float("nan"), "weight_decay must be a finite number, got nan"),
    ("grad_clip", float("nan"), "grad_clip must be a finite number"),
    ("eps", float("nan"), "eps must be a finite number"),
    ("device", "gpu", "--device 'gpu' is not a device"),
    ("device", 0, "device must be a string or null"),
])
def test_config_fields_are_type_checked(tmp_path, key, value, want):
    with pytest.raises(ValueError, match=re.escape(want)):
        TrainConfig.from_dict({key: value})
    p = tmp_path / "c.json"
    p.write_text(json.dumps({key: value}))          # JSON writes inf/nan as Infinity/NaN, which it reads
    with pytest.raises(ValueError, match=re.escape(f"{p}: {want}")):
        TrainConfig.from_json(p)


def test_config_accepts_what_the_annotations_allow(monkeypatch):
    cfg = TrainConfig.from_dict({"lr": 1, "max_steps": None, "mix": None, "packing": False, "device": "cpu",
                                 "data": ["a", "b@respond"]})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.packing is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device 'cuda:1': CUDA is not available"):
        TrainConfig(device="cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert TrainConfig(device="cuda:0").device == "cuda:0"
    with pytest.raises(ValueError, match="--device 'cuda:1': only 1 CUDA device"):
        TrainConfig(device="cuda:1")


def _data(tmp_path, n=12, seed=0, name="d.jsonl"):
    return write_jsonl(tmp_path / name, [{"prompt": r.prompt, "response": r.response,
                                          "category": "" if r.label == "respond" else r.label}
                                         for r in records(n, seed=seed)])


def test_resume_without_a_checkpoint_refuses(base, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    cfg = TrainConfig(base=str(base), data=[str(_data(tmp_path))], out=str(out), device="cpu", resume="auto",
                      progress=False, plot=False, max_steps=1)
    with pytest.raises(FileNotFoundError, match=f"no resumable checkpoint in {re.escape(str(out))}"):
        build_trainer(cfg, None)
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
    assert not (out / "final").exists()


def test_resume_refuses_a_changed_data_layout(base, tmp_path):
    data = _data(tmp_path)
    out = tmp_path / "run"
    common = dict(base=str(base), data=[str(data)], out=str(out), device="cpu", progress=False, plot=False,
                  seq_len=128, batch_size=4, epochs=1.0, lr=3e-3, warmup_steps=1, save_every=1, keep_last=1)
    assert build_trainer(TrainConfig(**common), None).train()["step"] == 3       # 12 rows, 4 per step
    assert [c.name for c in list_checkpoints(out)] == ["checkpoint-0000002"]

    def resume(**change):
        return build_trainer(TrainConfig(**{**common, "resume": "auto", **change}), None)

    with pytest.raises(ValueError, match=r"epochs: 1\.0 then, 2\.0 now"):
        resume(epochs=2.0)
    with pytest.raises(ValueError) as e:
        resume(seq_len=100, batch_size=2, seed=1)
    assert all(s in str(e.value) for s in ("seq_len: 128 then, 100 now", "global_batch: 4 then, 2 now",
                                           "seed: 0 then, 1 now", "--base"))
    with pytest.raises(ValueError, match=r"max_steps: None then, 5 now"):
        resume(max_steps=5)
    with pytest.raises(ValueError, match="packing: False then, True now"):
        resume(packing=True)
    with pytest.raises(ValueError, match="mix: None then"):
        resume(mix="1:0:1")
    with pytest.raises(ValueError, match="data: the tokenized examples differ"):
        resume(data=[str(_data(tmp_path, n=13, name="other.jsonl"))])
    # the same global batch split differently, and the same examples from another path: the same run
    assert resume(batch_size=2, grad_accum=2).step == 2
    copy = tmp_path / "moved.jsonl"
    copy.write_bytes(data.read_bytes())
    tr = resume(data=[str(copy)])
    assert tr.step == 2 and tr.total_steps == 3


def test_a_new_run_or_an_old_checkpoint_never_mixes_with_another_timeline(base, tmp_path):
    # Pruning keeps the highest steps whatever run wrote them: a new run in a folder holding an earlier
    # run's checkpoints lost its own (even the one saved on SIGTERM), and --resume then took the old run's.
    from rtkern.train.run import resolve_resume
    out = tmp_path / "run"
    common = dict(base=str(base), data=[str(_data(tmp_path))], out=str(out), device="cpu", progress=False,
                  plot=False, seq_len=128, batch_size=2, max_steps=5, lr=3e-3, warmup_steps=1, save_every=2,
                  keep_last=2)
    build_trainer(TrainConfig(**common), None).train()
    assert [c.name for c in list_checkpoints(out)] == ["checkpoint-0000002", "checkpoint-0000004"]
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(checkpoint-0000002, "
                                         r"checkpoint-0000004\): continue it with --resume"):
        resolve_resume(TrainConfig(**{**common, "lr": 1e-3}))
    with pytest.raises(ValueError, match=r"holds checkpoints after checkpoint-0000002 \(checkpoint-0000004\)"):
        resolve_resume(TrainConfig(**{**common, "resume": str(out / "checkpoint-0000002")}))
    assert resolve_resume(TrainConfig(**{**common, "resume": "auto"})).name == "checkpoint-0000004"
    # going back to step 2 in another folder is fine, and so is the newest checkpoint itself
    assert resolve_resume(TrainConfig(**{**common, "out": str(tmp_path / "other"),
                                         "resume": str(out / "checkpoint-0000002")})).name == "checkpoint-0000002"
    assert resolve_resume(TrainConfig(**{**common, "resume": str(out / "checkpoint-0000004")})).name == \
        "checkpoint-0000004"


def test_resume_keeps_the_metrics_window(base, tmp_path):
    """log_every=2, checkpoint at step 3: the step-4 record covers steps 3 and 4 as in a run without a stop."""
    common = dict(base=str(base), data=[str(_data(tmp_path))], device="cpu", progress=False, plot=False,
                  seq_len=128, batch_size=2, max_steps=6, lr=3e-3, warmup_steps=1, log_every=2, save_every=3)
    full = tmp_path / "full"
    build_trainer(TrainConfig(out=str(full), **common), None).train()
    ckpt = full / "checkpoint-0000003"
    resumed = tmp_path / "resumed"
    build_trainer(TrainConfig(out=str(resumed), resume=str(ckpt), **common), None).train()
    ref = {r["step"]: r for r in map(json.loads, (full / "metrics.jsonl").read_text().splitlines())}
    got = [json.loads(l) for l in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == [4, 6] and sorted(ref) == [2, 4, 6]
    for r in got:
        for k in ("loss", "tokens", "target_tokens", "lr", "grad_norm", "epoch"):
            assert r[k] == ref[r["step"]][k], (r["step"], k)


def test_resume_path_must_be_a_checkpoint_directory(tmp_path):
    from rtkern.train.run import resolve_resume
    f = tmp_path / "ckpt.txt"
    f.write_text("")
    for p in (tmp_path / "missing", f):
        with pytest.raises(FileNotFoundError, match=f"resume: {re.escape(str(p))} is not a checkpoint directory"):
            resolve_resume(TrainConfig(resume=str(p), out=str(tmp_path)))
    assert resolve_resume(TrainConfig(resume=str(tmp_path))) == tmp_path
    assert resolve_resume(TrainConfig(resume=None)) is None


def test_training_device_follows_the_local_rank(monkeypatch):
    """No GPU is needed: torch.device objects are only built, never used."""
    from types import SimpleNamespace

    from rtkern.train.run import training_device
    from rtkern.train.trainer import DistInfo
    rank1 = DistInfo(rank=1, world=2, local_rank=1)
    assert training_device(SimpleNamespace(device="cuda"), rank1) == torch.device("cuda", 1)
    assert training_device(SimpleNamespace(device="cuda:0"), rank1) == torch.device("cuda", 0)
    assert training_device(SimpleNamespace(device="cpu"), rank1) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_device(SimpleNamespace(device=None), rank1) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device(SimpleNamespace(device=None), rank1) == torch.device("cpu")


@pytest.mark.parametrize("parallel,world,want", [("fsdp", 2, "cpu"), ("ddp", 2, "cuda:1"), ("fsdp", 1, "cuda:0"),
                                                 ("auto", 2, "cuda:1")])
def test_fsdp_loads_the_base_on_the_cpu(monkeypatch, tmp_path, parallel, world, want):
    """Under FSDP with several ranks the whole model must not go to one GPU: the base loads on the CPU."""
    from types import SimpleNamespace

    import rtkern.train.run as run_mod
    from rtkern.train.trainer import DistInfo
    seen = []

    class Loaded(Exception):
        pass

    def fake_load(path, device, dtype):
        seen.append((path, device, dtype))
        raise Loaded
    monkeypatch.setattr(run_mod, "load_model", fake_load)
    cfg = SimpleNamespace(data=["d.jsonl"], device="cuda", parallel=parallel, resume=None, base="the-base",
                          scheme="single", out=str(tmp_path / "out"))
    with pytest.raises(Loaded):
        run_mod.build_trainer(cfg, DistInfo(rank=world - 1, world=world, local_rank=world - 1))
    assert seen == [("the-base", torch.device(want), torch.float32)]


def test_build_trainer_needs_data_and_the_checkpoints_scheme(base, tmp_path):
    with pytest.raises(ValueError, match="no training data: pass --data"):
        build_trainer(TrainConfig(base=str(base), out=str(tmp_path / "o"), device="cpu"), None)
    data = _data(tmp_path)
    common = dict(base=str(base), data=[str(data)], device="cpu", progress=False, plot=False, seq_len=128,
                  batch_size=4, max_steps=2, lr=3e-3, warmup_steps=1, scheme="single")
    out = tmp_path / "run"
    build_trainer(TrainConfig(out=str(out), save_every=1, **common), None).train()
    ckpt = out / "checkpoint-0000001"
    with pytest.raises(ValueError, match="was trained with scheme 'single', config says 'category'"):
        build_trainer(TrainConfig(out=str(tmp_path / "r"), resume=str(ckpt), **{**common, "scheme": "category"}), None)
