"""`rtkern bench sampler` end to end on a tiny CPU grid: files written, rows well-formed (no timing limits)."""
import json
import math
import statistics

import pytest
import transformers

from rtkern import cli

FIELDS = {"method", "kind", "batch", "vocab", "dtype", "us", "wall_us", "gbps", "floor_us", "x_floor",
          "max_prob_err", "decisions_match", "status", "error"}


def test_bench_sampler_cpu(tmp_path, capsys):
    rc = cli.main(["bench", "sampler", "--batch", "1", "--vocab", "1000", "--device", "cpu", "--no-progress",
                   "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "sampler.json").read_text())
    png = tmp_path / "sampler.png"
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["device"] == "cpu" and data["torch"] and "rows" in data
    rows = data["rows"]
    assert {r["method"] for r in rows} == {"naive", "rtkern-torch"}
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["status"] == "ok", r
        assert (r["batch"], r["vocab"], r["dtype"]) == (1, 1000, "fp32")
        assert r["us"] > 0 and r["wall_us"] > 0 and r["gbps"] > 0 and r["x_floor"] > 0
        assert r["decisions_match"] == 1.0 and r["max_prob_err"] < 1e-4
    out = capsys.readouterr().out
    assert "naive" in out and "rtkern-torch" in out and "sampler.json" in out


def test_bench_kernels(tmp_path, capsys):
    from conftest import ON_GPU
    from rtkern.bench.kernels import GEMM_OPS, OPS
    rc = cli.main(["bench", "kernels", "--models", "smollm2-135m", "--batches", "1", "--impls",
                   "torch,triton,cublas", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert {(r["op"], r["impl"]) for r in rows} == {(o, i) for o in OPS for i in ("torch", "triton")} | \
        {(o, "cublas") for o in GEMM_OPS + ("norm_qkv_rope",)}
    for r in rows:
        assert r["floor_us"] > 0
        if r["impl"] == "triton" and not ON_GPU:
            assert r["us"] is None and r["note"].startswith("skipped")
        else:
            assert r["us"] > 0 and not r["note"], r
    assert (tmp_path / "kernels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| decode_attention | smollm2-135m | 1 | torch |" in (tmp_path / "kernels.md").read_text()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny import save_tokenizer, tiny_hf
    d = tmp_path_factory.mktemp("tiny")
    tiny_hf().save_pretrained(d)
    save_tokenizer(d)
    return d


def test_bench_decode_cpu(tiny_dir, tmp_path, capsys):
    rc = cli.main(["bench", "decode", "--model", str(tiny_dir), "--batch", "1", "3", "--prompt", "8", "--new", "4",
                   "--reps", "1", "--device", "cpu", "--no-progress", "--out", str(tmp_path),
                   "--methods", "rtkern", "hf-dynamic", "hf-static", "gpt-fast"])
    assert rc == 0
    data = json.loads((tmp_path / "decode.json").read_text())
    assert (tmp_path / "decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {(r["batch"], r["method"]): r for r in data["rows"]}
    assert set(rows) == {(b, m) for b in (1, 3) for m in ("rtkern", "hf-dynamic", "hf-static", "gpt-fast")}
    for (b, m), r in rows.items():
        if m == "gpt-fast":
            assert r["status"] == "skipped"  # needs CUDA graphs
            continue
        assert r["status"] == "ok", r
        # a tiny model's step is lost in timing noise: check the bookkeeping, not the sign
        assert math.isfinite(r["ms_per_step"]) and r["tok_s"] == pytest.approx(b / r["ms_per_step"] * 1e3)
        assert len(r["t1_ms"]) == len(r["tn_ms"]) == 1 and r["floor_ms"] > 0
        assert (r["warning"] is not None) == (statistics.median(r["tn_ms"]) <= statistics.median(r["t1_ms"]))
    assert data["meta"]["bandwidth_source"] == "measured device copy" and data["meta"]["bandwidth"] > 1e8
    assert data["meta"]["env"]["transformers"] == transformers.__version__
    assert "ms/step" in capsys.readouterr().out and "ms/step" in (tmp_path / "decode.md").read_text()


def test_bench_decode_keeps_going_past_a_broken_model_and_a_spent_budget(tiny_dir, tmp_path):
    rc = cli.main(["bench", "decode", "--model", str(tmp_path / "missing"), str(tiny_dir), "--batch", "1", "2",
                   "--prompt", "8", "--new", "3", "--reps", "1", "--device", "cpu", "--no-progress",
                   "--out", str(tmp_path), "--methods", "rtkern", "--bandwidth", "1e10", "--time-budget", "1e-9"])
    assert rc == 0
    data = json.loads((tmp_path / "decode.json").read_text())
    assert data["meta"]["bandwidth_source"] == "--bandwidth" and data["meta"]["bandwidth"] == 1e10
    status = [(r["model"] == str(tiny_dir), r["status"]) for r in data["rows"]]
    assert status == [(False, "failed")] * 2 + [(True, "skipped")] * 2
    assert "loading the model: FileNotFoundError" in data["rows"][0]["error"]
    assert "past --time-budget" in data["rows"][2]["error"]


def test_bench_score(tiny_dir, tmp_path, capsys):
    rc = cli.main(["bench", "score", "--model", str(tiny_dir), "--num-prompts", "6", "--batch-size", "4",
                   "--reps", "1", "--dtype", "fp32", "--out", str(tmp_path)])
    assert rc == 0
    rows = {(r["method"], r["tokenize"]): r for r in json.loads((tmp_path / "score.json").read_text())["rows"]}
    assert set(rows) == {(m, t) for m in ("rtkern", "hf-loop") for t in ("timed", "cached")}
    assert all(rows[("rtkern", t)]["max_dp"] < 1e-5 for t in ("timed", "cached"))  # the same numbers, two ways
    assert all(r["prompts"] == 6 and r["prompts_s"] > 0 for r in rows.values())
    out = capsys.readouterr().out
    assert "| 4 | timed | rtkern | 6 |" in out and "| 4 | cached | rtkern | 6 |" in out


def test_bench_train(tiny_dir, tmp_path, capsys):
    rc = cli.main(["bench", "train", "--model", str(tiny_dir), "--batch", "2", "--seq", "24", "--steps", "1",
                   "--warmup", "1", "--methods", "rtkern", "hf", "--out", str(tmp_path)])
    assert rc == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "train.json").read_text())["rows"]}
    assert set(rows) == {"rtkern", "hf"} and not any(r["error"] for r in rows.values())
    # the same weights and batch: the same first loss, computed two ways
    assert rows["rtkern"]["loss0"] == pytest.approx(rows["hf"]["loss0"], rel=1e-4)
    assert all(r["tok_s"] > 0 and r["seq"] == 24 for r in rows.values())
    assert "| rtkern | 2 | 24 |" in capsys.readouterr().out


def test_generate_cli(tiny_dir, capsys):
    rc = cli.main(["generate", "--model", str(tiny_dir), "--device", "cpu", "--add-control-tokens", "single",
                   "--thresholds", "0", "--max-new-tokens", "5", "--json", "hello world", "please respond"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [x["prompt"] for x in lines] == ["hello world", "please respond"]
    for x in lines:  # threshold 0: every prompt refuses with the only category
        assert x["refused"] == 0 and x["category"] == "refuse" and 0 < x["refusal_probs"]["refuse"] < 1
    with pytest.raises(SystemExit) as e:   # a parse error: exit 2 before the model is loaded
        cli.main(["generate", "--model", str(tiny_dir), "--device", "cpu", "--add-control-tokens", "single",
                  "hello", "--thresholds", "a=1,=2"])
    assert e.value.code == 2 and "NAME=VALUE" in capsys.readouterr().err


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "sampler", "--dtype", "int8"])
    assert e.value.code == 2


@pytest.mark.parametrize("argv, message", [
    (["decode", "--new", "0"], "argument --new: must be at least 2"),
    (["decode", "--new", "1"], "argument --new: must be at least 2"),
    (["decode", "--reps", "0"], "argument --reps: must be at least 1"),
    (["decode", "--batch", "1", "0"], "argument --batch: must be at least 1"),
    (["decode", "--batch", "-2"], "argument --batch: must be at least 1"),
    (["decode", "--prompt", "0"], "argument --prompt: must be at least 1"),
    (["decode", "--bandwidth", "0"], "argument --bandwidth: must be finite and > 0"),
    (["score", "--num-prompts", "0"], "argument --num-prompts: must be at least 1"),
    (["score", "--reps", "0"], "argument --reps: must be at least 1"),
    (["score", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["train", "--batch", "0"], "argument --batch: must be at least 1"),
    (["train", "--seq", "0"], "argument --seq: must be at least 1"),
    (["train", "--steps", "0"], "argument --steps: must be at least 1"),
    (["sampler", "--reps", "0"], "argument --reps: must be at least 1"),
])
def test_bench_rejects_non_positive_counts(monkeypatch, capsys, argv, message):
    """0 used to be replaced by the default (``args.new or 16``) or become a failed row with exit 0."""
    import importlib
    mod = importlib.import_module(f"rtkern.bench.{argv[0]}")

    def boom(*a, **k):
        raise AssertionError("the benchmark ran")
    monkeypatch.setattr(mod, "model_args" if argv[0] == "train" else "run", boom)
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_decode_explicit_counts_are_used(monkeypatch):
    from rtkern.bench import decode
    got = {}
    monkeypatch.setattr(decode, "run", lambda models, batches, methods, device, dtype, **kw: got.update(
        batches=batches, **kw))
    assert cli.main(["bench", "decode", "--device", "cpu", "--new", "3", "--reps", "1", "--batch", "2"]) == 0
    assert (got["new"], got["reps"], got["batches"]) == (3, 1, [2])
    assert cli.main(["bench", "decode", "--device", "cpu"]) == 0          # CPU defaults
    assert (got["new"], got["reps"], got["batches"]) == (16, 3, [1, 8])


def test_group_without_a_command_prints_its_own_help(capsys):
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: rtkern bench") and "decode" in err and "sampler" in err
    assert cli.main([]) == 2 and capsys.readouterr().err.startswith("usage: rtkern ")
    from rtkern import __version__
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"rtkern {__version__}\n"
