"""rtkern.train.average: the weighted mean of checkpoints' weights, and refusal of checkpoints that differ."""
import json

import pytest
import torch

from rtkern.cli import main
from rtkern.loader import load_model
from rtkern.train import checkpoint as ck
from rtkern.train.average import average_checkpoints
from rtkern.train.prepare import add_control_tokens
from train_utils import make_base, one_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _run(tmp_path, name, *, seed, tie=True, layers=2, scheme="category", dtype=torch.float32):
    """A 'fine-tuned' checkpoint: a base plus control tokens, its weights moved by a seeded step."""
    model, tok = load_model(make_base(tmp_path / "base", tie=tie, layers=layers), device="cpu", dtype=torch.float32)
    ctrl = add_control_tokens(model, tok, scheme)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return ck.save_checkpoint(tmp_path / name, model.to(dtype), tok, ctrl)


def _weights(d):
    m, _ = load_model(d, device="cpu", dtype=torch.float32)
    return m, m.state_dict()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("weights", [None, [3.0, 1.0]])
def test_average_is_the_weighted_mean_and_keeps_tokens_and_tying(tmp_path, tie, weights):
    a, b = _run(tmp_path, "a", seed=1, tie=tie), _run(tmp_path, "b", seed=2, tie=tie)
    out = average_checkpoints([a, b], tmp_path / "soup", weights=weights)
    wa = 0.5 if weights is None else 0.75
    m, got = _weights(out)
    _, sa = _weights(a)
    _, sb = _weights(b)
    for k in got:
        torch.testing.assert_close(got[k], wa * sa[k] + (1 - wa) * sb[k], rtol=0, atol=1e-6)
    assert not torch.equal(got["layers.0.mlp.up_proj.weight"], sa["layers.0.mlp.up_proj.weight"])
    assert (m.lm_head.weight is m.embed_tokens.weight) == tie
    assert ck.load_control_tokens(out) == ck.load_control_tokens(a)


def test_bf16_checkpoints_average_in_float32_and_stay_bf16(tmp_path):
    from safetensors.torch import load_file
    a, b = (_run(tmp_path, n, seed=s, dtype=torch.bfloat16) for n, s in (("a", 1), ("b", 2)))
    out = average_checkpoints([a, b], tmp_path / "soup")
    got, sa, sb = (load_file(str(d / "model.safetensors")) for d in (out, a, b))
    for k in got:
        assert got[k].dtype == torch.bfloat16
        torch.testing.assert_close(got[k], ((sa[k].float() + sb[k].float()) / 2).to(torch.bfloat16), rtol=0, atol=0)


def test_three_checkpoints_through_the_cli(tmp_path, capsys):
    runs = [_run(tmp_path, f"r{i}", seed=i) for i in range(3)]
    assert main(["average", *map(str, runs), "--out", str(tmp_path / "soup")]) == 0
    assert "mean of 3 checkpoints" in capsys.readouterr().out
    _, got = _weights(tmp_path / "soup")
    states = [_weights(r)[1] for r in runs]
    k = "layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(got[k], sum(s[k] for s in states) / 3, rtol=0, atol=1e-6)


@pytest.mark.parametrize("argv_tail", [["--weights", "0", "1"], ["--weights", "nan", "1"]])
def test_cli_rejects_bad_weights_while_parsing(tmp_path, argv_tail):
    with pytest.raises(SystemExit) as e:
        main(["average", "a", "b", "--out", str(tmp_path / "o"), *argv_tail])
    assert e.value.code == 2


def test_cli_reports_bad_requests_without_a_traceback(tmp_path, capsys):
    a, b = _run(tmp_path, "a", seed=1), _run(tmp_path, "b", seed=2)
    assert main(["average", str(a), str(b), "--out", str(tmp_path / "o"), "--weights", "1", "2", "3"]) == 1
    assert capsys.readouterr().err.strip() == "rtkern average: error: expected one weight per checkpoint (2), got 3"
    assert main(["average", str(a), str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    assert "rtkern average: error: " in capsys.readouterr().err


def test_rejects_mismatched_or_malformed_requests(tmp_path):
    a, b = _run(tmp_path, "a", seed=1), _run(tmp_path, "b", seed=2)
    with pytest.raises(ValueError, match="at least two checkpoints, got 1"):
        average_checkpoints([a], tmp_path / "o")
    with pytest.raises(ValueError, match=r"one weight per checkpoint \(2\), got 3"):
        average_checkpoints([a, b], tmp_path / "o", weights=[1, 1, 1])
    for bad in ([1.0, 0.0], [1.0, -2.0], [1.0, float("inf")], [True, 1.0]):
        with pytest.raises(ValueError, match="finite and positive"):
            average_checkpoints([a, b], tmp_path / "o", weights=bad)
    with pytest.raises(ValueError, match="is one of the inputs"):
        average_checkpoints([a, b], b)
    deeper = _run(tmp_path / "x", "deep", seed=3, layers=3)
    with pytest.raises(ValueError, match=r"deep: architecture differs .*n_layers': \(2, 3\)"):
        average_checkpoints([a, deeper], tmp_path / "o")
    untied = _run(tmp_path / "z", "untied", seed=3, tie=False)
    with pytest.raises(ValueError, match=r"untied: architecture differs .*tie_word_embeddings': \(True, False\)"):
        average_checkpoints([a, untied], tmp_path / "o")
    renamed = _run(tmp_path / "w", "renamed", seed=3)
    meta = json.loads((renamed / "rtkern.json").read_text())
    meta["categories"] = meta["categories"][::-1]       # same ids, other meaning: not the same model family
    (renamed / "rtkern.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="renamed: control tokens differ"):
        average_checkpoints([a, renamed], tmp_path / "o")
    cfg = json.loads((a / "config.json").read_text())
    (a / "config.json").write_text(json.dumps({**cfg, "dtype": "float64", "torch_dtype": "float64"}))
    with pytest.raises(ValueError, match="dtype 'float64' is not float32, bfloat16 or float16"):
        average_checkpoints([a, b], tmp_path / "o")
    assert not (tmp_path / "o").exists()
