"""``rtkern train`` end to end on a tiny base, malformed data through the CLI, and DDP and FSDP2: two gloo
processes under torchrun equal one process on the same global batch, and FSDP checkpoints resume exactly."""
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from rtkern.cli import main
from rtkern.loader import load_model
from rtkern.train.checkpoint import STATE_TENSORS, checkpoint_name
from rtkern.train.config import TrainConfig
from rtkern.train.trainer import optimizer_state_by_index, optimizer_state_by_name
from train_utils import make_base, one_thread, records, write_jsonl


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    base = make_base(d / "base", tie=False)
    rows = [{"prompt": r.prompt, "response": r.response, "category": "" if r.label == "respond" else r.label}
            for r in records(16)]
    return base, write_jsonl(d / "data.jsonl", rows)


def _args(base, data, out, *extra):
    return ["train", "--base", str(base), "--data", str(data), "--out", str(out), "--scheme", "single",
            "--seq-len", "128", "--lr", "3e-3", "--seed", "3", "--no-progress", *extra]


def _metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_trains_and_writes_everything(setup, tmp_path, capsys):
    base, data = setup
    out = tmp_path / "run"
    assert main(_args(base, data, out, "--max-steps", "3", "--batch-size", "2", "--set", "warmup_steps=1")) == 0
    assert "done, 3 steps" in capsys.readouterr().out
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]
    assert (out / "loss.png").is_file() and json.loads((out / "train_config.json").read_text())["warmup_steps"] == 1
    model, tok = load_model(out / "final", device="cpu")
    assert tok.token_to_id("[refuse]") is not None and model.args.vocab_size % 64 == 0


def test_cli_reports_malformed_data(setup, tmp_path, capsys):
    base, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "respnse": "b"}\n')
    assert main(_args(base, bad, tmp_path / "o", "--max-steps", "1")) == 1
    assert "bad.jsonl:2: missing field 'response'" in capsys.readouterr().err
    assert main(["train", "--data", str(bad), "--set", "lr=abc"]) == 1
    assert "lr: cannot parse" in capsys.readouterr().err
    assert main(["train", "--data", str(bad), "--set", "parallel=zero3"]) == 1
    assert "parallel must be one of auto, ddp, fsdp, got 'zero3'" in capsys.readouterr().err


def test_cli_resume_without_checkpoint_and_mistyped_config(setup, tmp_path, capsys):
    base, data = setup
    out = tmp_path / "empty"
    assert main(_args(base, data, out, "--max-steps", "1", "--resume")) == 1
    assert f"no resumable checkpoint in {out}" in capsys.readouterr().err
    assert not (out / "final").exists() and not (out / "metrics.jsonl").exists()
    cfg = tmp_path / "c.json"
    cfg.write_text('{"packing": "false", "lr": "1e-3"}')
    assert main(["train", "--data", str(data), "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "packing must be true or false, got 'false' (str)" in err and "lr must be a finite number" in err


def test_parallel_flag_and_setting(capsys):
    assert main(["train", "--parallel", "fsdp", "--set", "fsdp_accum_sync=yes", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["parallel"] == "fsdp" and cfg["fsdp_accum_sync"] is True
    with pytest.raises(SystemExit):
        main(["train", "--parallel", "zero3"])
    with pytest.raises(ValueError, match="parallel must be"):
        TrainConfig(parallel="FSDP")


def test_optimizer_state_names_round_trip():
    """FSDP's gathered optimizer state (keyed by parameter name) maps onto Optimizer.state_dict()'s integer
    keys and back, so every checkpoint has one format."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    params = dict(net.named_parameters())
    opt = torch.optim.AdamW([{"params": [params["0.weight"], params["2.weight"]], "weight_decay": 0.1},
                             {"params": [params["0.bias"], params["1.weight"], params["1.bias"]],
                              "weight_decay": 0.0}])   # 2.bias: not optimised
    net(torch.randn(5, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    names = ["0.weight", "2.weight", "0.bias", "1.weight", "1.bias"]
    named = optimizer_state_by_name(sd, names)
    assert named["param_groups"][1]["params"] == names[2:] and set(named["state"]) == set(names)
    assert optimizer_state_by_index(named) == sd
    with pytest.raises(ValueError, match="5 parameters, the model 4"):
        optimizer_state_by_name(sd, names[:4])


_COMMON = ["--max-steps", "4", "--grad-accum", "2", "--device", "cpu", "--set", "warmup_steps=1",
           "--set", "grad_clip=0.5", "--no-plot"]


def _torchrun(base, data, out, *extra):
    """``rtkern train`` in two gloo processes (2 rows per micro-batch each: the global batch of 4)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rtkern.cli", *_args(base, data, out, "--batch-size", "2", *extra)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode and _gloo_abort(proc.stderr):
        # gloo's TCP transport can abort a rank from a C++ thread under load ("terminate called without an
        # active exception", SIGABRT; cf. pytorch/pytorch#188266), before any of our code fails. Seen once
        # in six full suites on 2 shared cores; a second attempt tells that apart from a real failure.
        warnings.warn(f"gloo aborted a rank; running torchrun again:\n{proc.stderr[-1500:]}")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _gloo_abort(stderr: str) -> bool:
    """A rank killed by SIGABRT from std::terminate, with no Python exception of ours behind it."""
    ours = [line for line in stderr.splitlines()
            if re.match(r"[\w.]*(Error|Exception): ", line) and "ChildFailedError" not in line]
    return "terminate called without an active exception" in stderr and "Signal 6 (SIGABRT)" in stderr and not ours


def _assert_same_run(a_out, b_out, *, final=True):
    a, b = _metrics(a_out), _metrics(b_out)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["target_tokens"] for r in a] == [r["target_tokens"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
    if final:
        ma = load_model(a_out / "final", device="cpu")[0].state_dict()
        mb = load_model(b_out / "final", device="cpu")[0].state_dict()
        assert ma.keys() == mb.keys()
        for k in ma:
            torch.testing.assert_close(ma[k], mb[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_ddp_two_gloo_processes_equal_single_process(setup, tmp_path):
    base, data = setup
    single = tmp_path / "single"
    assert main(_args(base, data, single, "--batch-size", "4", *_COMMON)) == 0
    ddp = tmp_path / "ddp"
    _torchrun(base, data, ddp, *_COMMON)
    _assert_same_run(single, ddp)


@pytest.mark.slow
def test_fsdp_two_gloo_processes_equal_single_process(setup, tmp_path):
    """FSDP2 (sharded parameters, accumulation without a reduce-scatter per micro-batch, DTensor grad
    clipping) trains like one process, and its checkpoints gather to the single-process format."""
    base, data = setup
    common = [*_COMMON, "--save-every", "2"]
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    assert main(_args(base, data, single, "--batch-size", "4", *common)) == 0
    proc = _torchrun(base, data, fsdp, "--parallel", "fsdp", *common)
    assert "FSDP2 over 2 ranks" in proc.stderr
    _assert_same_run(single, fsdp)
    a = torch.load(single / checkpoint_name(2) / STATE_TENSORS, weights_only=True)["optimizer"]
    b = torch.load(fsdp / checkpoint_name(2) / STATE_TENSORS, weights_only=True)["optimizer"]
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i, st in a["state"].items():
        assert st.keys() == b["state"][i].keys()
        for k, v in st.items():
            assert not b["state"][i][k].is_meta
            torch.testing.assert_close(v, b["state"][i][k], rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_fsdp_resumes_exactly_and_single_process_resumes_its_checkpoint(tmp_path):
    """An FSDP checkpoint (tied embedding: one shared sharded parameter) resumes under FSDP and in one
    process with the losses and weights of the run that was not interrupted."""
    base = make_base(tmp_path / "tied", tie=True)
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": r.prompt, "response": r.response,
                                                  "category": "" if r.label == "respond" else r.label}
                                                 for r in records(16, seed=1)])
    common = [*_COMMON, "--save-every", "2"]
    full = tmp_path / "full"
    _torchrun(base, data, full, "--parallel", "fsdp", *common)
    ckpt = full / checkpoint_name(2)
    resumed = tmp_path / "resumed"
    # and with a reduce-scatter per micro-batch instead of one per step: the same gradients
    _torchrun(base, data, resumed, "--parallel", "fsdp", "--resume", str(ckpt), "--set", "fsdp_accum_sync=1", *common)
    single = tmp_path / "single"
    assert main(_args(base, data, single, "--batch-size", "4", "--resume", str(ckpt), *common)) == 0
    tail = [r for r in _metrics(full) if r["step"] > 2]
    for out in (resumed, single):
        got = _metrics(out)
        assert [r["step"] for r in got] == [3, 4]
        for ra, rb in zip(tail, got):
            assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    for out in (resumed, single):
        ma = load_model(full / "final", device="cpu")[0].state_dict()
        mb = load_model(out / "final", device="cpu")[0].state_dict()
        for k in ma:
            torch.testing.assert_close(ma[k], mb[k], rtol=1e-4, atol=1e-6)


def _printed_config(capsys, *argv):
    assert main(["train", *argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def test_every_flag_reaches_its_config_field(capsys):
    cfg = _printed_config(
        capsys, "--base", "b", "--scheme", "single", "--out", "o", "--mix", "1:1:2", "--epoch-examples", "10",
        "--seq-len", "64", "--batch-size", "3", "--grad-accum", "2", "--epochs", "1.5", "--max-steps", "7",
        "--lr", "0.002", "--warmup-steps", "4", "--weight-decay", "0.05", "--grad-clip", "0.7", "--dtype", "fp32",
        "--control-weight", "2.5", "--ce-chunk", "128", "--save-every", "5", "--keep-last", "3", "--log-every", "6",
        "--seed", "11", "--device", "cpu", "--kernels", "triton", "--parallel", "ddp", "--data", "a", "b",
        "--data", "c", "--packing", "--activation-checkpointing", "--no-progress", "--no-plot", "--resume")
    want = dict(base="b", scheme="single", out="o", mix="1:1:2", epoch_examples=10, seq_len=64, batch_size=3,
                grad_accum=2, epochs=1.5, max_steps=7, lr=0.002, warmup_steps=4, weight_decay=0.05, grad_clip=0.7,
                dtype="fp32", control_weight=2.5, ce_chunk=128, save_every=5, keep_last=3, log_every=6, seed=11,
                device="cpu", kernels="triton", parallel="ddp", data=["a", "b", "c"], packing=True,
                activation_checkpointing=True, compile=False, progress=False, plot=False, resume="auto")
    assert {k: cfg[k] for k in want} == want
    assert all(type(cfg[k]) is type(v) for k, v in want.items())       # 1.5 epochs stay a float, 4 steps an int
    assert _printed_config(capsys, "--compile", "--resume", "runs/x/checkpoint-0000002")["compile"] is True
    assert _printed_config(capsys, "--resume", "runs/x/checkpoint-0000002")["resume"] == "runs/x/checkpoint-0000002"
    plain = _printed_config(capsys)
    assert (plain["packing"], plain["activation_checkpointing"], plain["compile"]) == (False, False, False)
    assert (plain["progress"], plain["plot"], plain["resume"], plain["data"]) == (True, True, None, [])


def test_config_file_then_flags_then_set(capsys, tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"lr": 0.001, "seq_len": 64, "seed": 5, "packing": True}))
    cfg = _printed_config(capsys, "--config", str(f))
    assert (cfg["lr"], cfg["seq_len"], cfg["seed"], cfg["packing"]) == (0.001, 64, 5, True)
    cfg = _printed_config(capsys, "--config", str(f), "--lr", "0.002", "--seed", "6")
    assert (cfg["lr"], cfg["seq_len"], cfg["seed"]) == (0.002, 64, 6)       # flags beat the file
    cfg = _printed_config(capsys, "--config", str(f), "--lr", "0.002", "--set", "lr=0.003", "--set", "seq_len=32")
    assert (cfg["lr"], cfg["seq_len"], cfg["seed"]) == (0.003, 32, 5)       # --set beats both, and repeats


class _FakeTrainer:
    def __init__(self, result, *, rank=0, signal=None):
        from rtkern.train.trainer import DistInfo
        self.result, self.dist, self._stop_signal = result, DistInfo(rank=rank, world=2 if rank else 1), signal

    def train(self):
        return self.result


@pytest.mark.parametrize("rank", [0, 1])
def test_exit_status_and_messages_of_a_run(monkeypatch, capsys, rank):
    """Completed: 0 and (rank 0 only) the last logged loss; interrupted: 128 + the signal (SIGTERM when
    unknown), on every rank."""
    import rtkern.train.run as run_mod
    done = {"status": "completed", "step": 5, "losses": [(1, 2.0), (5, 0.25)], "path": "runs/x/final"}
    cut = {"status": "interrupted", "step": 3, "losses": [(1, 2.0)], "path": "runs/x/checkpoint-0000003"}
    cases = [(done, None, 0), ({**done, "losses": []}, None, 0), (cut, 2, 130), (cut, None, 143)]
    for result, sig, rc in cases:
        monkeypatch.setattr(run_mod, "build_trainer", lambda cfg, r=result, s=sig: _FakeTrainer(r, rank=rank, signal=s))
        assert main(["train", "--data", "x.jsonl", "--no-plot"]) == rc
        out, err = capsys.readouterr()
        if rank:
            assert "rtkern train:" not in out + err
        elif rc == 0:
            last = "0.2500" if result["losses"] else "nan"
            assert f"rtkern train: done, 5 steps, last loss {last}; model in runs/x/final" in out
        else:
            assert "interrupted at step 3; resumable checkpoint in runs/x/checkpoint-0000003" in err


@pytest.mark.parametrize("exc", [NotImplementedError("no FSDP here"), FileNotFoundError("no FSDP here"),
                                 ValueError("no FSDP here")])
def test_errors_while_building_are_reported_with_status_1(monkeypatch, capsys, exc):
    import rtkern.train.run as run_mod

    def fail(cfg):
        raise exc
    monkeypatch.setattr(run_mod, "build_trainer", fail)
    assert main(["train", "--data", "x.jsonl"]) == 1
    assert "rtkern train: error: no FSDP here" in capsys.readouterr().err
