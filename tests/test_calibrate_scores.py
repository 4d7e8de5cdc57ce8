"""`rtkern calibrate --scores`: thresholds chosen again from a saved scores.jsonl, without the model."""
import json

import numpy as np
import pytest

from rtkern import cli
from rtkern.calibrate import choose_best_f1, choose_for_target_rate
from rtkern.calibrate_control import choose_controllable
from rtkern.calibrate_data import load_scores
from rtkern.spec import CATEGORIES
from rtkern.thresholds import load_thresholds
from tiny import save_scoring_model, write_labelled_jsonl

CLI = ["--batch-size", "4", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def scored(tiny_category, tmp_path_factory):
    """One scoring run of the tiny category model (best F1) and its scores.jsonl."""
    d = tmp_path_factory.mktemp("scored")
    data = write_labelled_jsonl(d / "d.jsonl", 20)
    assert cli.main(["calibrate", "--model", str(tiny_category), "--data", str(data), *CLI, "--out", str(d / "o")]) == 0
    return d / "o"


def _labels(saved):
    y = saved.data.should_refuse
    cat = np.array([saved.names.index(c) if r and c in saved.names else -1
                    for r, c in zip(y, saved.data.categories)])
    return saved.scores[:, :len(saved.names)], y, cat


def test_load_scores_reads_back_what_calibrate_wrote(scored):
    saved = load_scores(scored / "scores.jsonl")
    rows = [json.loads(line) for line in (scored / "scores.jsonl").read_text().splitlines()]
    assert saved.names == list(CATEGORIES) and saved.has_respond and saved.scores.shape == (20, 6)
    want = np.array([[r["probs"][c] for c in CATEGORIES] + [r["respond"]] for r in rows], np.float32)
    np.testing.assert_array_equal(saved.scores, want)
    assert saved.data.prompts == [r["prompt"] for r in rows]
    assert saved.data.sources == [r["source"] for r in rows] and saved.data.sources[0].endswith("d.jsonl:1")
    assert list(saved.data.should_refuse) == [r["should_refuse"] for r in rows]


def test_same_criterion_same_thresholds_and_other_criteria_without_the_model(scored, tmp_path, capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("--scores loaded a model")
    monkeypatch.setattr("rtkern.loader.load_model", no_load)
    first = load_thresholds(scored / "thresholds.json")
    assert cli.main(["calibrate", "--scores", str(scored / "scores.jsonl"), "--out", str(tmp_path / "a")]) == 0
    again = load_thresholds(tmp_path / "a" / "thresholds.json")
    assert again.thresholds == first.thresholds and again.mode == first.mode
    assert again.metadata["scores"] == str(scored / "scores.jsonl") and "model" not in again.metadata
    report = (tmp_path / "a" / "report.md").read_text()
    assert "- **scoring**: none (probabilities read from --scores)" in report
    assert (tmp_path / "a" / "scores.jsonl").read_text() == (scored / "scores.jsonl").read_text()
    probs, y, cat = _labels(load_scores(scored / "scores.jsonl"))
    for extra, want in [(["--target-rate", "0.6"], choose_for_target_rate(probs, y, cat, 0.6)),
                        (["--max-over-refusal", "0.3", "--keep-control"], choose_controllable(probs, y, cat, 0.3))]:
        out = tmp_path / extra[0].strip("-")
        assert cli.main(["calibrate", "--scores", str(scored / "scores.jsonl"), *extra, "--out", str(out)]) == 0
        got = load_thresholds(out / "thresholds.json")
        np.testing.assert_array_equal([got.thresholds[c] for c in CATEGORIES], want.thresholds)
    np.testing.assert_array_equal([first.thresholds[c] for c in CATEGORIES], choose_best_f1(probs, y, cat).thresholds)
    capsys.readouterr()


@pytest.mark.parametrize("extra, message", [
    (["--model", "m"], "--scores reads probabilities already computed: --model does not apply"),
    (["--limit", "3"], "--limit does not apply"),
    (["--device", "cpu"], "--device does not apply"),
])
def test_scores_rejects_scoring_options(tmp_path, capsys, extra, message):
    rc = cli.main(["calibrate", "--scores", str(tmp_path / "s.jsonl"), *extra, "--out", str(tmp_path / "o")])
    assert rc == 1 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_model_and_data_required_without_scores(tmp_path, capsys):
    for args in (["--model", "m"], ["--data", "d.csv"], []):
        assert cli.main(["calibrate", *args, "--out", str(tmp_path / "o")]) == 1
        assert "--model and --data are required (or --scores FILE" in capsys.readouterr().err


def test_single_token_scores_and_keep_control(tmp_path, capsys):
    d = tmp_path / "m"
    save_scoring_model(d, ["[refuse]", "[respond]"])
    data = write_labelled_jsonl(tmp_path / "d.jsonl", 12)
    assert cli.main(["calibrate", "--model", str(d), "--data", str(data), *CLI, "--out", str(tmp_path / "o")]) == 0
    saved = load_scores(tmp_path / "o" / "scores.jsonl")
    assert saved.names == ["refuse"] and saved.scores.shape == (12, 2)
    rc = cli.main(["calibrate", "--scores", str(tmp_path / "o" / "scores.jsonl"), "--max-over-refusal", "0.2",
                   "--keep-control", "--out", str(tmp_path / "o2")])
    assert rc == 1 and "--keep-control needs category tokens" in capsys.readouterr().err


def _row(**over):
    row = {"source": "x:1", "prompt": "hi", "should_refuse": True, "category": "Humanizing requests",
           "probs": {"a": 0.1, "b": 0.2}, "respond": 0.5}
    row.update(over)
    return {k: v for k, v in row.items() if v is not ...}


@pytest.mark.parametrize("rows, message", [
    ([_row(), _row(probs={"b": 0.2, "a": 0.1})], r":2: categories \['b', 'a'\] \+ respond differ from the first"),
    ([_row(), _row(respond=...)], r":2: categories \['a', 'b'\] differ from the first row's \['a', 'b'\] \+ respond"),
    ([_row(probs={"a": 1.5, "b": 0.2})], r":1: probabilities must be numbers in \[0, 1\] or null, got 1.5"),
    ([_row(probs={"a": "0.1", "b": 0.2})], r":1: probabilities must be numbers in \[0, 1\] or null, got '0.1'"),
    ([_row(probs={})], r":1: 'probs' must be an object of category name -> probability"),
    ([_row(should_refuse="yes")], r":1: 'should_refuse' must be true or false, got 'yes'"),
    ([_row(prompt=...)], r":1: missing field 'prompt' \(not a scores.jsonl of rtkern calibrate\?\)"),
    ([_row(prompt="  ")], r":1: 'prompt' must be a non-empty string"),
    ([], r"no prompts"),
])
def test_load_scores_rejects_malformed_files(tmp_path, rows, message):
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=message):
        load_scores(path)


def test_load_scores_missing_file_and_null_probabilities(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no such scores file"):
        load_scores(tmp_path / "nope.jsonl")
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(_row()) + "\n" + json.dumps(_row(source="x:2", probs={"a": None, "b": 0.2})) + "\n")
    saved = load_scores(path)
    assert np.isnan(saved.scores[1, 0]) and not np.isnan(saved.scores[0]).any()
    assert cli.main(["calibrate", "--scores", str(path), "--out", str(tmp_path / "o")]) == 1
    assert "1 prompts have no probabilities (null), first at x:2" in capsys.readouterr().err
