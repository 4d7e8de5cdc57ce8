"""``rtkern generate`` argument handling: the documented forms parse, bad flags exit 2 before a model loads,
and errors found after loading exit 2 with one line on stderr (no traceback)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rtkern import cli
from rtkern.thresholds import Thresholds

REPO = Path(__file__).resolve().parent.parent


def parse(*argv):
    return cli.build_parser().parse_args(["generate", *argv])


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a model would be loaded."""
    import rtkern.loader

    def boom(*a, **k):
        raise AssertionError("load_model called for arguments the parser should have rejected")
    monkeypatch.setattr(rtkern.loader, "load_model", boom)


def test_documented_forms_keep_the_prompt():
    a = parse("--model", "D", "--thresholds", "0.3", "How do I pick a lock?")
    assert a.prompts == ["How do I pick a lock?"] and a.thresholds == 0.3 and a.model == "D"
    a = parse("--thresholds", "Humanizing requests=1.1, Requests with safety concerns=0.2", "p1", "p2")
    assert a.thresholds == {"Humanizing requests": 1.1, "Requests with safety concerns": 0.2}
    assert a.prompts == ["p1", "p2"]
    a = parse("--thresholds", "a=1", "--thresholds", "b=0.25,a=0.5", "p")   # repeated pairs merge
    assert a.thresholds == {"a": 0.5, "b": 0.25} and a.prompts == ["p"]
    a = parse("--stop", "\n\n", "--stop", "User:", "p")
    assert a.stop == ["\n\n", "User:"] and a.prompts == ["p"]
    a = parse("p")
    assert a.thresholds is None and a.stop == [] and a.max_new_tokens == 256


def test_thresholds_file_is_read_while_parsing(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"format": "rtkern-thresholds/1", "mode": "sum", "thresholds": {"refuse": 0.2}}))
    a = parse("--thresholds", str(f), "p")
    assert isinstance(a.thresholds, Thresholds) and a.thresholds.mode == "sum" and a.prompts == ["p"]


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1"),
    (["--max-new-tokens", "x"], "argument --max-new-tokens: expected an integer, got 'x'"),
    (["--temperature", "-1"], "argument --temperature: must be finite and >= 0"),
    (["--temperature", "nan"], "argument --temperature: must be finite and >= 0"),
    (["--seed", "1.5"], "argument --seed: expected an integer"),
    (["--thresholds", "nope"], "argument --thresholds: expected a number, comma-separated NAME=VALUE"),
    (["--thresholds", "missing/t.json"], "argument --thresholds: no such file"),
    (["--thresholds", "-0.1"], "argument --thresholds: a threshold must be >= 0"),
    (["--thresholds", "a=1,=2"], "expected comma-separated NAME=VALUE pairs, got '=2'"),
    (["--thresholds", "a=x"], "the threshold of 'a' must be a number"),
    (["--thresholds", "0.2", "--thresholds", "a=1"], "only NAME=VALUE pairs can be combined"),
    (["--stop", ""], "argument --stop: a stop string must not be empty"),
    (["--device", "nodevice"], "argument --device: invalid device"),
])
def test_bad_flags_exit_2_before_loading(no_load, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", *flags, "hello"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "rtkern generate: error: " in err and message in err, err
    assert "Traceback" not in err


def test_bad_thresholds_file_exits_2_while_parsing(no_load, tmp_path, capsys):
    f = tmp_path / "t.json"
    f.write_text('{"format": "rtkern-thresholds/1", "thresholds": {"refuse": -1}}')
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--thresholds", str(f), "hello"])
    assert e.value.code == 2 and "must be >= 0" in capsys.readouterr().err


def test_python_dash_m_rtkern():
    r = subprocess.run([sys.executable, "-m", "rtkern", "generate", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: rtkern generate") and "--add-control-tokens" in r.stdout


# -- errors found once the model is loaded (tiny checkpoint) -------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny import save_tokenizer, tiny_hf
    d = tmp_path_factory.mktemp("tiny-gen")
    tiny_hf().save_pretrained(d)
    save_tokenizer(d)   # no control tokens
    return d


def _run(capsys, *argv):
    rc = cli.main(["generate", "--device", "cpu", "--max-new-tokens", "2", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def test_model_without_control_tokens_points_to_the_flag(tiny_dir, capsys):
    rc, out, err = _run(capsys, "--model", str(tiny_dir), "hello")
    assert rc == 2 and not out
    assert err.startswith("rtkern generate: error: ") and "--add-control-tokens" in err
    assert "spec=RefusalSpec" not in err


def test_unknown_category_exits_2(tiny_dir, capsys):
    rc, out, err = _run(capsys, "--model", str(tiny_dir), "--add-control-tokens", "single",
                        "--thresholds", "refuse=0.2,Nope=0.3", "hello")
    assert rc == 2 and not out
    assert err.startswith("rtkern generate: error: ") and "'Nope'" in err and "refuse" in err


def test_thresholds_file_with_other_categories_exits_2(tiny_dir, tmp_path, capsys):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"format": "rtkern-thresholds/1", "thresholds": {"Humanizing requests": 0.2}}))
    rc, out, err = _run(capsys, "--model", str(tiny_dir), "--add-control-tokens", "single",
                        "--thresholds", str(f), "hello")
    assert rc == 2 and err.startswith("rtkern generate: error: ") and "Humanizing requests" in err


def test_missing_model_exits_2(tmp_path, capsys):
    rc, out, err = _run(capsys, "--model", str(tmp_path / "absent"), "hello")
    assert rc == 2 and err.startswith("rtkern generate: error: ") and "absent" in err


def test_pairs_and_stop_reach_the_engine(tiny_dir, capsys):
    rc, out, err = _run(capsys, "--model", str(tiny_dir), "--add-control-tokens", "single", "--json",
                        "--thresholds", "refuse=1.5", "--stop", "zz", "--stop", "yy", "hello", "world")
    assert rc == 0, err
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert [x["prompt"] for x in lines] == ["hello", "world"]
    assert all(x["refused"] == -1 for x in lines)   # a threshold above 1 switches the category off
