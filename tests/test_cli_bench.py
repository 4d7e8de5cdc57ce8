"""`rtkern bench sampler` end to end on a tiny CPU grid: files written, rows well-formed (no timing limits)."""
import json

import pytest

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


def test_placeholder_commands_say_not_available(capsys):
    assert cli.main(["bench", "decode"]) == 2
    assert "not available" in capsys.readouterr().err


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "sampler", "--dtype", "int8"])
    assert e.value.code == 2
