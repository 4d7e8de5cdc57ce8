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


def test_defaults_and_more_argument_forms(monkeypatch):
    a = parse("p")
    assert (a.mode, a.temperature, a.seed, a.dtype, a.add_control_tokens, a.json) == (None, 0.0, 0, None, None, False)
    a = parse("--thresholds", "x=y=0.5", "--mode", "free", "--seed", str(-2**63), "p")
    assert a.thresholds == {"x=y": 0.5} and a.mode == "free"     # the value follows the last '='
    assert parse("--seed", str(2**63 - 1), "p").seed == 2**63 - 1


@pytest.mark.parametrize("flags, message", [
    (["--thresholds", "nan"], "argument --thresholds: a threshold must be >= 0"),
    (["--thresholds", "a=nan"], "the threshold of 'a' must be >= 0"),
    (["--thresholds", "missing/thresholds"], "argument --thresholds: no such file, and not a number"),
    (["--temperature", "inf"], "argument --temperature: must be finite and >= 0 (0 = greedy)"),
    (["--seed", str(2**63)], "argument --seed: must fit in int64"),
    (["--seed", str(-2**63 - 1)], "argument --seed: must fit in int64"),
    (["--device", "cuda"], "argument --device: 'cuda' requested but CUDA is not available"),
])
def test_more_bad_flags_exit_2(no_load, monkeypatch, capsys, flags, message):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", *flags, "hello"])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_parse_thresholds_forms():
    from rtkern.generate_cli import DEFAULT_THRESHOLD, parse_thresholds
    from rtkern.spec import RefusalSpec
    spec = RefusalSpec([5, 6], 7, names=["a", "b"])
    assert parse_thresholds(None, spec) == DEFAULT_THRESHOLD == 0.5      # the --help text's default
    assert parse_thresholds(0.3, spec) == 0.3 and parse_thresholds("0.3", spec) == 0.3   # API: strings parse
    assert parse_thresholds("b=0.2", spec) == {"b": 0.2}
    with pytest.raises(ValueError, match=r"unknown category \['c'\]; this model's categories: \['a', 'b'\]"):
        parse_thresholds({"a": 0.1, "c": 0.2}, spec)
    with pytest.raises(ValueError, match="'c'"):
        parse_thresholds(Thresholds({"c": 0.2}), spec)


# -- what reaches the engine, and the plain-text report (loader and Engine faked: no model) ---------------

class FakeEngine:
    def __init__(self, model, tok, spec, max_batch):
        from rtkern.spec import RefusalSpec
        self.spec, self.max_batch = spec or RefusalSpec([5], 6), max_batch


@pytest.fixture
def fake_engine(monkeypatch):
    import rtkern.engine
    import rtkern.loader
    loaded = {}
    monkeypatch.setattr(rtkern.loader, "load_model", lambda name, device, dtype: loaded.update(
        name=name, device=device, dtype=dtype) or (None, None))
    monkeypatch.setattr(rtkern.engine, "Engine", FakeEngine)
    return loaded


def test_options_reach_the_sampling_params(fake_engine):
    import torch
    from rtkern.generate_cli import _setup
    engine, params = _setup(parse("--model", "M", "--device", "cpu", "--thresholds", "0.2", "--mode", "sum",
                                  "--temperature", "0.7", "--seed", "-3", "--max-new-tokens", "9", "--stop", "zz",
                                  "--stop", "yy", "p1", "p2"))
    assert fake_engine == {"name": "M", "device": torch.device("cpu"), "dtype": torch.float32}  # fp32 on CPU
    assert engine.max_batch == 2
    assert (params.thresholds, params.mode, params.temperature, params.seed, params.max_new_tokens,
            params.stop) == (0.2, "sum", 0.7, -3, 9, ("zz", "yy"))
    engine, params = _setup(parse("--device", "cpu", "--dtype", "bf16", *["p"] * 40))
    assert fake_engine["dtype"] == torch.bfloat16 and engine.max_batch == 32     # at most 32 rows at once
    assert params.thresholds == 0.5 and params.mode == "category"
    assert (params.temperature, params.seed, params.max_new_tokens, params.stop) == (0.0, 0, 256, ())
    args = parse("p")
    args.device = "cuda"             # CUDA's default dtype, without needing a GPU (the loader is faked)
    engine, _ = _setup(args)
    assert fake_engine["dtype"] == torch.bfloat16 and engine.max_batch == 1


def test_plain_text_report(monkeypatch, capsys):
    from types import SimpleNamespace as R
    import rtkern.generate_cli as g
    results = [R(text="No.", refused=0, category="refuse", refusal_probs={"refuse": 0.75}),
               R(text="Hi!", refused=-1, category=None, refusal_probs={"refuse": 0.125}),
               R(text="", refused=-2, category=None, refusal_probs={"refuse": float("nan")})]
    engine = R(generate=lambda prompts, params: results[:len(prompts)])
    monkeypatch.setattr(g, "_setup", lambda args: (engine, None))
    assert cli.main(["generate", "a", "b", "c"]) == 0
    assert capsys.readouterr().out == (">>> a\n[REFUSED (refuse)] first-token p: refuse=0.7500\nNo.\n\n"
                                       ">>> b\n[answered] first-token p: refuse=0.1250\nHi!\n\n"
                                       ">>> c\n[invalid logits] first-token p: refuse=nan\n\n\n")
    for r in results:
        r.finish_reason, r.tokens = "stop", [1]
    assert cli.main(["generate", "--json", "a"]) == 0
    assert json.loads(capsys.readouterr().out) == {"prompt": "a", "text": "No.", "refused": 0, "category": "refuse",
                                                   "refusal_probs": {"refuse": 0.75}, "finish_reason": "stop",
                                                   "tokens": [1]}
