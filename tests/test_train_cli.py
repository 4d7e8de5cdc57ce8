"""``rtkern train`` end to end on a tiny base, malformed data through the CLI, and DDP: two gloo
processes under torchrun equal one process on the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch

from rtkern.cli import main
from rtkern.loader import load_model
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


@pytest.mark.slow
def test_ddp_two_gloo_processes_equal_single_process(setup, tmp_path):
    base, data = setup
    common = ["--max-steps", "4", "--grad-accum", "2", "--device", "cpu", "--set", "warmup_steps=1",
              "--set", "grad_clip=0.5", "--no-plot"]
    single = tmp_path / "single"
    assert main(_args(base, data, single, "--batch-size", "4", *common)) == 0
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rtkern.cli", *_args(base, data, ddp, "--batch-size", "2", *common)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _metrics(single), _metrics(ddp)
    assert [r["target_tokens"] for r in a] == [r["target_tokens"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
    ma = load_model(single / "final", device="cpu")[0].state_dict()
    mb = load_model(ddp / "final", device="cpu")[0].state_dict()
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=1e-4, atol=1e-6)
