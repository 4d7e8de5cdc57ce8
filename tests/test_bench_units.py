"""The benchmarks' arithmetic and reports on fake timings, against hand-computed numbers: bytes a step or op
must move, unit conversions, medians, step counts, table columns, CLI defaults. No model is timed and there
are no timing thresholds (tests/test_cli_bench.py runs the benchmarks end to end)."""
import io
import json
import types

import pytest
import torch

from rtkern import cli
from rtkern.bench import decode, kernels, sampler, score, train
from rtkern.model import ModelArgs, Transformer
from rtkern.spec import RefusalSpec

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, intermediate_size=96)  # head_dim 16
# per layer: 2 norms 2*64 + q 64*64 + k, v 2*(32*64) + o 64*64 + gate, up, down 3*(96*64) = 30848;
# 2 layers + the final norm: 61760; plus one [320, 64] matrix (the LM head, tied or not): 82240
TINY_WEIGHTS = 82240


def tiny_model(tie=False, dtype=torch.float32):
    return Transformer(ModelArgs(**TINY, tie_word_embeddings=tie)).to(dtype)


class FakeClock:
    """``time.perf_counter`` stand-in: ``tick(dt)`` advances it (a fake call that takes ``dt`` seconds)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def tick(self, dt):
        self.now += dt


# -- decode: bytes per step ---------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_step_bytes_counts_each_weight_once_plus_k_and_v(tie):
    # untied: the input embedding only gathers B rows (not counted), the LM head is read whole;
    # tied: the shared matrix is read once, as the LM head
    m = tiny_model(tie, torch.bfloat16)
    kv = 3 * 2 * 2 * 2 * 10 * 16          # B=3 x (K, V) x 2 layers x 2 KV heads (GQA) x context 10 x head_dim 16
    assert decode.step_bytes(m, 3, 10) == (TINY_WEIGHTS + kv) * 2
    assert decode.step_bytes(m, 1, 0) == TINY_WEIGHTS * 2


def test_step_bytes_smollm2_random_shape(monkeypatch):
    # SmolLM2-135M (tied, 134,515,008 parameters) in bf16 at B=1 and the CPU default's mean context
    # 128 + 16 // 2: 269,030,016 weight bytes + 2 x 30 layers x 3 KV heads x 64 x 2 bytes = 23,040 per token.
    # The '-random' subject must stay tied (to_empty used to untie it: the LM head counted twice, +21%).
    monkeypatch.setattr(decode, "random_weights_", lambda m: m)   # shapes and sharing matter here, not values
    model, _, _ = decode.load_subject("smollm2-135m-random", "cpu", torch.bfloat16)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert decode.step_bytes(model, 1, 136) == 269_030_016 + 23_040 * 136


# -- decode: one point on fake timings --------------------------------------------------------------

def fake_point(monkeypatch, t1s, tns, *, batch=2, prompt=8, new=5, bandwidth=1e9, build=None):
    """`bench_point` with ``build`` and the timer faked: the 1-token call's reps take ``t1s``, the
    ``new``-token call's ``tns``. Returns (row, run(n) calls, prompts)."""
    calls, seen = [], {}

    def fake_build(method, model, tok, spec, prompts, max_new):
        seen["prompts"] = prompts
        return calls.append

    left = {1: list(t1s), new: list(tns)}

    def fake_times(fn, reps):
        fn()
        return [left[calls[-1]].pop(0) for _ in range(reps)]
    monkeypatch.setattr(decode, "build", build or fake_build)
    monkeypatch.setattr(decode, "_times_s", fake_times)
    spec = RefusalSpec([10, 11, 12, 13, 14], respond_id=15)   # low ids: prompts must stay below 10
    row = decode.bench_point(tiny_model(), None, spec, "tiny", "fp32", batch, "rtkern", prompt=prompt, new=new,
                             reps=len(t1s), bandwidth=bandwidth)
    return row, calls, seen.get("prompts")


def test_bench_point_derived_numbers(monkeypatch):
    row, calls, prompts = fake_point(monkeypatch, [0.010, 0.030, 0.012], [0.050, 0.052, 0.090])
    assert calls == [5, 1, 5, 1, 5, 1, 5]  # warm-up with `new` tokens, then 1-token and new-token calls in turn
    assert len(prompts) == 2 and all(len(p) == 8 and max(p) < 10 for p in prompts)  # no control ids
    # medians (not means): t1 = 12 ms, tn = 52 ms; 5 new tokens are 4 decode steps -> 10 ms per step
    assert row.status == "ok" and row.warning is None
    assert row.ms_per_step == pytest.approx(10.0) and row.first_token_ms == pytest.approx(12.0)
    assert row.tok_s == pytest.approx(200.0)                      # B=2 tokens per 10 ms step
    # bytes: fp32 weights 82240 * 4 + KV 2 x (K, V) x 2 layers x 2 heads x (8 + 5 // 2) x 16 x 4 = 339200
    assert row.gbps == pytest.approx(339200 / 0.01 / 1e9)          # 0.03392 GB/s
    assert row.floor_ms == pytest.approx(0.3392)                   # 339200 B at 1e9 B/s
    assert row.pct_bw == pytest.approx(3.392)                      # percent, not a fraction
    assert row.t1_ms == [10.0, 30.0, 12.0] and row.tn_ms == [50.0, 52.0, 90.0]


def test_bench_point_flags_a_step_lost_in_noise(monkeypatch):
    row, _, _ = fake_point(monkeypatch, [0.020], [0.015])
    assert row.status == "ok" and row.warning.startswith("t(new) <= t(1)")
    # no negative step time or rates in the table, JSON or plot; the raw times stay
    assert row.ms_per_step is None and row.tok_s is None and row.gbps is None and row.pct_bw is None
    assert row.t1_ms == [20.0] and row.tn_ms == [15.0]
    # equal medians: flagged too, and no division by the zero step (used to raise ZeroDivisionError
    # outside the point's try, ending the whole run)
    row, _, _ = fake_point(monkeypatch, [0.020], [0.020])
    assert row.status == "ok" and row.warning.startswith("t(new) <= t(1)")
    assert row.ms_per_step is None and row.tok_s is None and row.gbps is None and row.pct_bw is None
    assert row.floor_ms == pytest.approx(0.3392)


def test_bench_point_unavailable_is_skipped_other_errors_failed(monkeypatch):
    def unavailable(*a):
        raise decode.Unavailable("needs CUDA")
    row, _, _ = fake_point(monkeypatch, [0.01], [0.02], build=unavailable)
    assert (row.status, row.error, row.ms_per_step) == ("skipped", "needs CUDA", None)

    def broken(*a):
        raise RuntimeError("boom " * 100)
    row, _, _ = fake_point(monkeypatch, [0.01], [0.02], build=broken)
    assert row.status == "failed" and row.error.startswith("RuntimeError: boom") and len(row.error) == 300


# -- decode: the run loop, files and table ------------------------------------------------------------

def fake_run(monkeypatch, tmp_path, **kw):
    got = []
    spec = RefusalSpec([10, 11], respond_id=12)

    def point(model, tok, spec, name, dtype, batch, method, *, prompt, new, reps, bandwidth):
        got.append((method, reps, bandwidth))
        return decode.Row(name, dtype, batch, method, ms_per_step=1.0)
    monkeypatch.setattr(decode, "load_subject", lambda name, device, dtype: (object(), None, spec))
    monkeypatch.setattr(decode, "bench_point", point)
    monkeypatch.setattr(decode, "copy_bandwidth", lambda device: 2.5e12)
    monkeypatch.setattr(decode, "plot", lambda rows, path: path)
    monkeypatch.setattr(decode, "environment", lambda device: {"device": "cpu"})
    decode.run(["m"], [1], ["rtkern", "hf-dynamic"], torch.device("cpu"), "fp32", prompt=8, new=4, reps=5,
               out_dir=tmp_path, progress=False, **kw)
    return got, json.loads((tmp_path / "decode.json").read_text())


def test_run_uses_baseline_reps_for_transformers_only(monkeypatch, tmp_path):
    got, data = fake_run(monkeypatch, tmp_path, baseline_reps=2)
    assert got == [("rtkern", 5, 2.5e12), ("hf-dynamic", 2, 2.5e12)]   # the measured copy bandwidth
    meta = data["meta"]
    assert (meta["prompt"], meta["new_tokens"], meta["reps"], meta["baseline_reps"]) == (8, 4, 5, 2)
    assert (meta["bandwidth"], meta["bandwidth_source"]) == (2.5e12, "measured device copy")
    assert (tmp_path / "decode.md").read_text().startswith("bandwidth 2.50 TB/s (measured device copy)\n")

    got, data = fake_run(monkeypatch, tmp_path, bandwidth=3e12)     # no baseline reps: --reps for all
    assert got == [("rtkern", 5, 3e12), ("hf-dynamic", 5, 3e12)] and data["meta"]["baseline_reps"] == 5
    assert (tmp_path / "decode.md").read_text().startswith("bandwidth 3.00 TB/s (--bandwidth)\n")


def test_decode_table_columns():
    rows = [decode.Row("m", "bf16", 8, "rtkern", ms_per_step=1.5, tok_s=5333.3, gbps=812.25, pct_bw=26.9,
                       floor_ms=0.4, first_token_ms=12.25, warning="t(new) <= t(1): noise"),
            decode.Row("m", "bf16", 8, "gpt-fast", status="skipped", error="needs CUDA")]
    head, rule, ok, skipped = decode.format_table(rows).splitlines()
    assert head.split() == ["model", "dtype", "B", "method", "ms/step", "floor", "ms", "tok/s", "GB/s", "%bw",
                            "1-token", "ms"]
    assert ok.split() == ["m", "bf16", "8", "rtkern", "1.500", "0.400", "5333.3", "812.2", "26.9", "12.2",
                          "(t(new)", "<=", "t(1):", "noise)"]
    assert skipped.split() == ["m", "bf16", "8", "gpt-fast"] + ["-"] * 6 + ["skipped:", "needs", "CUDA"]


def test_decode_cli_defaults(monkeypatch):
    got = {}
    monkeypatch.setattr(decode, "run", lambda models, batches, methods, device, dtype, **kw: got.update(
        models=models, methods=methods, **kw))
    assert cli.main(["bench", "decode", "--device", "cpu"]) == 0
    assert got["models"] == ["smollm2-135m-instruct"] and got["methods"] == ("rtkern", "hf-dynamic", "hf-static")
    assert (got["baseline_reps"], got["bandwidth"], got["time_budget"]) == (3, None, None)
    assert cli.main(["bench", "decode", "--device", "cpu", "--reps", "7"]) == 0
    assert got["baseline_reps"] == 3                                 # --reps, at most 3
    assert cli.main(["bench", "decode", "--device", "cpu", "--reps", "7", "--baseline-reps", "4",
                     "--time-budget", "60"]) == 0
    assert (got["baseline_reps"], got["time_budget"]) == (4, 60.0)


@pytest.mark.parametrize("argv, message", [
    (["--time-budget", "0"], "argument --time-budget: must be finite and > 0"),
    (["--bandwidth", "inf"], "argument --bandwidth: must be finite and > 0"),
    (["--baseline-reps", "0"], "argument --baseline-reps: must be at least 1"),
])
def test_decode_rejects_bad_limits(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(decode, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "decode", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_decode_run_from_args_checks_a_namespace(monkeypatch):
    # run_from_args may be handed a Namespace that no parser checked
    monkeypatch.setattr(decode, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
    p = cli.build_parser()
    args = p.parse_args(["bench", "decode", "--device", "cpu"])
    args.new = 1
    with pytest.raises(SystemExit, match="--new must be at least 2"):
        decode.run_from_args(args)


def test_random_subject_has_seeded_weights_and_reserved_control_ids(monkeypatch):
    # '<shape>-random' on a tiny shape: matrices N(0, 0.02) from seed 0, norms 1, the last 6 ids reserved
    monkeypatch.setattr(ModelArgs, "from_name", classmethod(lambda cls, name: ModelArgs(**TINY)))
    model, tok, spec = decode.load_subject("tiny-random", "cpu", torch.float32)
    again, _, _ = decode.load_subject("tiny-random", "cpu", torch.float32)
    assert tok is None and spec.refusal_ids == (314, 315, 316, 317, 318) and spec.respond_id == 319
    params = dict(model.named_parameters())
    assert all(torch.equal(p, again.state_dict()[n]) for n, p in params.items())
    assert all(bool((p == 1).all()) for n, p in params.items() if p.dim() == 1)
    w = torch.cat([p.flatten() for p in params.values() if p.dim() > 1])
    assert abs(w.mean().item()) < 1e-3 and 0.019 < w.std().item() < 0.021


# -- sampler -----------------------------------------------------------------------------------------

def test_sampler_point_bytes_and_units(monkeypatch):
    # B=2 x V=1000 bf16 logits = 4000 bytes; at 1e9 B/s the floor is 4 us; a 50 us call moves 0.08 GB/s
    monkeypatch.setattr(sampler, "time_call", lambda call, device, reps: (50.0, 80.0))
    [row] = sampler.bench_point(2, 1000, "bf16", ["naive"], "cpu", bandwidth=1e9)
    assert row.status == "ok", row.error
    assert (row.us, row.wall_us) == (50.0, 80.0)
    assert row.floor_us == pytest.approx(4.0) and row.gbps == pytest.approx(0.08)
    assert row.x_floor == pytest.approx(12.5)
    assert row.decisions_match == 1.0 and row.max_prob_err < 1e-2       # bf16 logits, fp32 reference


def test_sampler_prob_error_is_the_largest_and_match_a_fraction():
    spec = RefusalSpec([0, 1])
    want = (torch.tensor([[0.5, 0.5], [0.2, 0.8]]), torch.tensor([0, -1], dtype=torch.int32))
    got = sampler.SampleOutput(torch.tensor([3, 4]), torch.tensor([[0.5, 0.4], [0.2, 0.79]]),
                               torch.tensor([0, 1], dtype=torch.int32))
    err, match = sampler._check_result(got, None, spec, None, want)
    assert err == pytest.approx(0.1) and match == 0.5


def test_time_call_cpu_is_the_median_and_caps_slow_points(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(sampler.time, "perf_counter", clock)
    durations = [100.0, 1e-6, 9e-6, 2e-6]          # the first call is the untimed warm-up
    us, wall = sampler.time_call(lambda: clock.tick(durations.pop(0)), "cpu", reps=3)
    assert us == pytest.approx(2.0) and wall == us and not durations
    durations = [0.0, 2.5, 2.7, 2.6, 9.0, 9.0]      # calls over 2 s: stop after 3 timed ones
    us, _ = sampler.time_call(lambda: clock.tick(durations.pop(0)), "cpu", reps=5)
    assert us == pytest.approx(2.6e6) and durations == [9.0, 9.0]


def test_copy_bandwidth_counts_read_and_write(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(sampler.time, "perf_counter", lambda: clock.tick(1e-3) or clock())
    # every copy takes 1 ms on the fake clock: 1 MiB read + 1 MiB written per ms
    assert sampler.copy_bandwidth("cpu", nbytes=1 << 20) == pytest.approx(2 * 2**20 / 1e-3)
    sizes, empty = [], torch.empty
    monkeypatch.setattr(torch, "empty", lambda n, **kw: sizes.append(n) or empty(16, **kw))  # no 1 GiB here
    assert sampler.copy_bandwidth("cpu") == pytest.approx(2 * 2**28 / 1e-3)    # the CPU copies 256 MiB
    assert sizes == [1 << 28]


def test_make_spec_needs_one_ordinary_token():
    spec = sampler.make_spec(7, categories=5)
    assert spec.refusal_ids == (1, 2, 3, 4, 5) and spec.respond_id == 6
    assert sampler.make_spec(6, categories=5, respond=False).refusal_ids == (1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match="larger than the 6 control tokens"):
        sampler.make_spec(6, categories=5)


def test_sampler_tables():
    rows = [sampler.Row("naive", "eager", 8, 49152, "bf16", us=12.34, wall_us=56.78, gbps=63.7, floor_us=1.0,
                        x_floor=12.34, max_prob_err=1e-7, decisions_match=1.0, note="n"),
            sampler.Row("naive-graph", "graph", 8, 49152, "bf16", status="skipped", error="no CUDA")]
    head, _, ok, skipped = sampler.format_table(rows).splitlines()
    assert head.split() == list(sampler.TABLE_COLUMNS)
    assert ok.split() == ["49152", "bf16", "8", "naive", "12.3", "56.8", "63.7", "12.34", "1.0e-07", "1.000", "n"]
    assert skipped.split() == ["49152", "bf16", "8", "naive-graph"] + ["-"] * 6 + ["skipped:", "no", "CUDA"]
    md = sampler.format_markdown(rows).splitlines()
    assert md[0] == "| V | dtype | B | method | µs | wall µs | GB/s | × floor | note |"
    assert md[2] == "| 49152 | bf16 | 8 | naive | 12.3 | 56.8 | 63.7 | 12.34 | n |"
    assert md[3] == "| 49152 | bf16 | 8 | naive-graph | - | - | - | - | skipped: no CUDA |"


def sampler_args(monkeypatch, *argv):
    """What `rtkern bench sampler ARGV` hands `run` (the grid is not run)."""
    got = {}

    def fake_run(batches, vocabs, dtypes, methods, device, out_dir, **kw):
        got.update(batches=batches, vocabs=vocabs, dtypes=dtypes, methods=methods, **kw)
        return {"rows": []}
    monkeypatch.setattr(sampler, "run", fake_run)
    monkeypatch.setattr(sampler, "copy_bandwidth", lambda device: 7e11)
    rc = cli.main(["bench", "sampler", "--device", "cpu", *argv])
    return rc, got


def test_sampler_cli_lists_defaults_and_bandwidth(monkeypatch):
    rc, got = sampler_args(monkeypatch, "--batch", "1,8", "2", "--vocab", "1000", "--dtype", "bf16,fp32")
    assert rc == 0 and (got["batches"], got["vocabs"], got["dtypes"]) == ([1, 8, 2], [1000], ["bf16", "fp32"])
    assert got["methods"] == ["naive", "rtkern-torch"] and got["categories"] == 5 and got["reps"] == 5
    assert got["bandwidth"] == 7e11 and got["argv"] == ["--device", "cpu", "--batch", "1,8", "2", "--vocab",
                                                       "1000", "--dtype", "bf16,fp32"]
    rc, got = sampler_args(monkeypatch, "--bandwidth", "3.35e12")
    assert rc == 0 and got["bandwidth"] == 3.35e12


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "must be positive (got [0])"),
    (["--vocab", "6"], "vocab [6] too small for 5 refusal tokens + [respond]"),   # 6 control ids, no other
])
def test_sampler_cli_rejects_impossible_grids(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sampler, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
    assert cli.main(["bench", "sampler", "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


def test_sampler_cli_without_cuda_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sampler, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
    assert cli.main(["bench", "sampler", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_sampler_exit_status_only_when_every_row_failed(monkeypatch):
    for statuses, rc in ((["error", "error"], 1), (["error", "ok"], 0), (["skipped", "skipped"], 0)):
        monkeypatch.setattr(sampler, "run", lambda *a, **k: {"rows": [{"status": s} for s in statuses]})
        monkeypatch.setattr(sampler, "copy_bandwidth", lambda device: 1e9)
        assert cli.main(["bench", "sampler", "--device", "cpu"]) == rc, statuses


def test_sampler_json_names_its_bandwidth(monkeypatch, tmp_path):
    monkeypatch.setattr(sampler, "bench_point", lambda *a, **k: [sampler.Row("naive", "eager", 1, 8, "fp32")])
    monkeypatch.setattr(sampler, "plot", lambda rows, path, title: path)
    result = sampler.run([1], [8], ["fp32"], ["naive"], "cpu", tmp_path, bandwidth=1.5e12, progress=False,
                         stream=io.StringIO(), argv=["--batch", "1"])
    data = json.loads((tmp_path / "sampler.json").read_text())
    assert data["bandwidth_bytes_per_s"] == 1.5e12 and data["command"] == "rtkern bench sampler --batch 1"
    assert result["rows"] == data["rows"] and data["categories"] == 5


# -- kernels -----------------------------------------------------------------------------------------

# bf16 bytes each op must move at B=2 on the tiny shape (D=64, H=4, KV heads 2, Dh=16, I=96, V=320),
# context 384: weights + activations read + outputs written (+ fp32 RoPE table rows read per head)
KERNEL_BYTES = {
    "norm_qkv": (128 * 64 + 2 * 64 + 2 * 128 + 64) * 2,              # W + x + out + norm weight
    "o_residual": (64 * 64 + 2 * 64 + 2 * 64 * 2) * 2,               # W + x + (out, residual); no norm
    "norm_gate_up_swiglu": (192 * 64 + 2 * 64 + 2 * 96 + 64) * 2,    # writes the SwiGLU half only
    "down_residual": (64 * 96 + 2 * 96 + 2 * 64 * 2) * 2,
    "lm_head": (320 * 64 + 2 * 64 + 2 * 320 + 64) * 2,
    "add_rmsnorm": (4 * 2 * 64 + 64) * 2,                             # x, residual in; out, sum out; weight
    "swiglu": 3 * 2 * 96 * 2,                                         # gate+up in, product out
    "decode_attention": (2 * 2 * 2 * 384 * 16 + 2 * 2 * 4 * 16) * 2,  # K + V, q in + out
    "attention_o_residual": (2 * 2 * 2 * 384 * 16 + 2 * 4 * 16 + 64 * 64 + 2 * 2 * 64) * 2,
    "rope_cache": 2 * 2 * 8 * 16 * 2 + 2 * 16 * 4,                 # qkv in, q/k/v out; one cos+sin row per batch row
    "norm_qkv_rope": (128 * 64 + 2 * 64 + 64 + 2 * 128) * 2 + 2 * 16 * 4,
}


def test_kernel_op_bytes():
    assert set(KERNEL_BYTES) == set(kernels.OPS)
    args = ModelArgs(**TINY)
    got = {op: kernels.make_op(op, args, 2, torch.bfloat16, "cpu")[1] for op in kernels.OPS}
    assert got == KERNEL_BYTES


def test_kernel_floor_in_microseconds(monkeypatch):
    monkeypatch.setattr(kernels, "time_call", lambda call, device: (7.0, 7.0))
    # SwiGLU at B=1 on SmolLM2 (I=1536), bf16: 3 x 1536 x 2 = 9216 bytes -> 9.216 us at 1e9 B/s
    [row] = kernels.bench_op("swiglu", "smollm2-135m", 1, torch.bfloat16, torch.device("cpu"), ["torch"], 1e9)
    assert (row.impl, row.us, row.graph_us) == ("torch", 7.0, None) and row.floor_us == pytest.approx(9.216)


def test_kernels_cli_checks_names_and_drops_cpu_compile(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match=r"unknown op\(s\) \['nope'\]"):
        cli.main(["bench", "kernels", "--ops", "swiglu,nope"])
    with pytest.raises(SystemExit, match=r"unknown impl\(s\) \['cuda'\]"):
        cli.main(["bench", "kernels", "--impls", "cuda"])
    got = []
    monkeypatch.setattr(kernels, "bench_op", lambda op, name, B, dtype, device, impls, bw: got.append(
        (op, name, B, list(impls), bw)) or [])
    assert cli.main(["bench", "kernels", "--device", "cpu", "--ops", "swiglu", "--models", "smollm2-135m",
                     "--batches", "1,8", "--impls", "torch,torch-compile", "--bandwidth", "2e12", "--no-progress",
                     "--out", str(tmp_path)]) == 0
    # torch.compile on a CPU takes minutes for numbers nobody needs: dropped
    assert got == [("swiglu", "smollm2-135m", 1, ["torch"], 2e12), ("swiglu", "smollm2-135m", 8, ["torch"], 2e12)]


# -- score -------------------------------------------------------------------------------------------

def test_score_rows(monkeypatch, tmp_path):
    p_hf = torch.tensor([[0.5, 0.2], [0.1, 0.1]])
    p_rt = p_hf + torch.tensor([[-0.3, 0.1], [0.0, 0.0]])        # largest difference negative: |dp| = 0.3
    monkeypatch.setattr(score, "load_subject", lambda name, device, dtype: (None, object(), None))
    monkeypatch.setattr(score, "hf_view", lambda model: None)
    monkeypatch.setattr(score, "environment", lambda device: {})
    timed = iter([(2.0, p_hf), (0.5, p_rt), (1.0, p_hf), (0.1, p_rt)])  # hf-loop, then rtkern; timed, cached
    monkeypatch.setattr(score, "_timed", lambda fn, reps, device: next(timed))
    hf, rt, hf_c, rt_c = score.run("m", ["a"] * 6, [4], torch.device("cpu"), "fp32", 1, tmp_path)
    assert (hf.method, hf.tokenize, hf.seconds, hf.prompts_s, hf.speedup, hf.max_dp) == ("hf-loop", "timed", 2.0, 3.0,
                                                                                        1.0, 0.0)
    assert (rt.method, rt.seconds, rt.prompts_s, rt.speedup) == ("rtkern", 0.5, 12.0, 4.0)
    assert rt.max_dp == pytest.approx(0.3)
    assert (hf_c.tokenize, rt_c.tokenize, rt_c.speedup) == ("cached", "cached", 10.0)   # against the cached hf-loop
    assert score.format_table([hf, rt_c]).splitlines()[2:] == [
        "| 4 | timed | hf-loop | 6 | 2.000 | 3.0 | 1.00x | 0.0e+00 |",
        "| 4 | cached | rtkern | 6 | 0.100 | 60.0 | 10.00x | 3.0e-01 |"]


def test_score_adds_a_kept_graph_scorer_on_cuda(monkeypatch, tmp_path):
    made = []

    class FakeScorer:  # records how the bench builds it; CUDA graphs themselves are tested on a GPU
        def __init__(self, model, tok, spec, *, batch_size, cuda_graphs):
            made.append((batch_size, cuda_graphs))

        def __call__(self, prompts, progress=True):
            return ("graphs", len(prompts), progress)

    monkeypatch.setattr(score, "Scorer", FakeScorer)
    monkeypatch.setattr(score, "load_subject", lambda name, device, dtype: (None, object(), None))
    monkeypatch.setattr(score, "hf_view", lambda model: None)
    monkeypatch.setattr(score, "environment", lambda device: {})
    ran = []

    def timed(fn, reps, device):
        ran.append(fn())
        return 1.0, torch.zeros(2, 2)

    monkeypatch.setattr(score, "_timed", timed)
    monkeypatch.setattr(score, "hf_loop", lambda *a: "hf")
    monkeypatch.setattr(score, "score", lambda *a, **k: "eager")
    rows = score.run("m", ["a"] * 2, [4, 8], torch.device("cuda"), "bf16", 1, tmp_path)
    assert [(r.method, r.batch_size, r.tokenize) for r in rows[:6]] == [
        ("hf-loop", 4, "timed"), ("rtkern", 4, "timed"), ("rtkern-graphs", 4, "timed"),
        ("hf-loop", 4, "cached"), ("rtkern", 4, "cached"), ("rtkern-graphs", 4, "cached")]
    assert len(rows) == 12 and made == [(4, True), (4, True), (8, True), (8, True)]
    assert ran[:3] == ["hf", "eager", ("graphs", 2, False)]


def test_cached_chat_renders_each_prompt_once():
    calls = []

    class Tok:
        eos_ids = [1]

        def apply_chat_template(self, messages, add_generation_prompt=True):
            calls.append(messages[0]["content"])
            return [len(messages[0]["content"]), int(add_generation_prompt)]

    tok = score.CachedChat(Tok())
    for _ in range(3):
        assert [tok.apply_chat_template([{"role": "user", "content": p}]) for p in ("ab", "abc")] == [[2, 1], [3, 1]]
    assert tok.apply_chat_template([{"role": "user", "content": "ab"}], add_generation_prompt=False) == [2, 0]
    convs = [[{"role": "user", "content": p}] for p in ("abc", "abcd")]
    assert tok.apply_chat_template_batch(convs) == [[3, 1], [4, 1]]
    assert calls == ["ab", "abc", "ab", "abcd"] and tok.eos_ids == [1]


def test_hf_chat_tokenizes_like_rtkern(tiny_category):
    from rtkern.loader import load_model
    _, tok = load_model(tiny_category, device="cpu")
    convs = [[{"role": "user", "content": p}] for p in ("hello", "respond to the user kindly", "x")]
    assert tok.hf_tokenizer is not None
    assert score.hf_chat(tok)(convs) == tok.apply_chat_template_batch(convs) == [tok.apply_chat_template(m)
                                                                                 for m in convs]
    sp = types.SimpleNamespace(hf_tokenizer=None, apply_chat_template=lambda m, add_generation_prompt: [len(m)])
    assert score.hf_chat(sp)(convs) == [[1]] * 3


def test_score_timing_is_the_median_after_a_warm_up(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(score.time, "perf_counter", clock)
    durations = [50.0, 1.0, 7.0, 2.0]
    t, res = score._timed(lambda: clock.tick(durations.pop(0)) or len(durations), 3, torch.device("cpu"))
    assert t == 2.0 and res == 0 and not durations


def test_score_cli_defaults_and_data_cut(monkeypatch, tmp_path):
    got = {}
    monkeypatch.setattr(score, "run", lambda model, prompts, batches, device, dtype, reps, out: got.update(
        prompts=prompts, batches=batches, reps=reps) or [])
    assert cli.main(["bench", "score", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert (len(got["prompts"]), got["batches"], got["reps"]) == (64, [16], 1)
    import rtkern.calibrate_data
    monkeypatch.setattr(rtkern.calibrate_data, "load_labelled",
                        lambda path: types.SimpleNamespace(prompts=[f"p{i}" for i in range(10)]))
    assert score._prompts("data.csv", 3) == ["p0", "p1", "p2"]


# -- train -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("frac, p", [(0.38, 3), (0.0, 0)])
def test_train_batch_masks_the_prompt_the_same_way_for_both(frac, p):
    # T=10, the first int(10 * frac) tokens are prompt: HF labels mask them; rtkern predicts tokens p..9
    # from positions p-1..8 (HF shifts labels by one inside the loss)
    b = train.make_batch(ModelArgs(**TINY), 2, 10, frac, "cpu")
    tok, labels = b["tokens"], b["labels"]
    assert bool((labels[:, :p] == -100).all()) and torch.equal(labels[:, p:], tok[:, p:])
    first = max(p, 1)       # HF never predicts token 0
    assert b["index"].tolist() == list(range(first - 1, 9)) + list(range(10 + first - 1, 19))
    assert torch.equal(b["targets"], tok[:, first:].reshape(-1))


def test_train_step_timing(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(train.time, "perf_counter", clock)
    calls = []

    def step():
        calls.append(1)
        clock.tick(0.25)
        return torch.tensor(1.5)
    monkeypatch.setattr(train, "_rtkern_step", lambda method, args, batch, device: step)
    row = train.bench_method("rtkern", ModelArgs(**TINY), 2, 10, torch.device("cpu"), warmup=2, steps=4,
                             prompt_frac=0.3)
    assert row.error is None and row.loss0 == 1.5
    assert len(calls) == 6                      # 2 warm-up steps (the first gives loss0), 4 timed
    assert row.step_ms == pytest.approx(250.0) and row.tok_s == pytest.approx(80.0)   # 2 x 10 tokens / 0.25 s


def test_train_table_ratios_against_hf():
    rows = [train.Row("rtkern", 2, 10, tok_s=300.0, step_ms=1.0, peak_gib=1.0, loss0=2.0),
            train.Row("hf", 2, 10, tok_s=100.0, step_ms=3.0, peak_gib=4.0, loss0=2.0)]
    assert train.format_table(rows).splitlines()[2:] == [
        "| rtkern | 2 | 10 | 300 | 1.0 | 1.00 | 3.00 | 0.25 | 2.0000 |  |",
        "| hf | 2 | 10 | 100 | 3.0 | 4.00 | 1.00 | 1.00 | 2.0000 |  |"]


def test_train_cli_defaults_and_prompt_frac(monkeypatch, tmp_path):
    got = []
    monkeypatch.setattr(train, "model_args", lambda name: ModelArgs(**TINY))
    monkeypatch.setattr(train, "bench_method", lambda m, args, B, T, device, **kw: got.append((m, B, T, kw))
                        or train.Row(m, B, T))
    assert cli.main(["bench", "train", "--device", "cpu", "--out", str(tmp_path)]) == 0
    kw = dict(warmup=3, steps=2, prompt_frac=0.3)
    assert got == [("rtkern", 2, 128, kw), ("hf", 2, 128, kw)]
    with pytest.raises(SystemExit, match="--prompt-frac in"):
        cli.main(["bench", "train", "--device", "cpu", "--prompt-frac", "1", "--out", str(tmp_path)])
