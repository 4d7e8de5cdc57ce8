"""rtkern.train.evaluate: argmax first-token decisions and the per-category rate table."""
import torch

from rtkern.engine import Engine
from rtkern.loader import load_model
from rtkern.train.evaluate import argmax_refusals, markdown, rate_table
from tiny import save_tokenizer, tiny_hf

PROMPTS = ["hello", "please refuse", "world world", "respond kindly to the user", "hello world", "refuse this"]


def test_argmax_refusals_match_the_greedy_first_token(tmp_path):
    hf = tiny_hf(seed=5)
    hf.save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    model, tok = load_model(tmp_path, device="cpu")
    ids = tok.add_control_tokens(["[refuse]", "[respond]"])
    base = torch.randn(64, generator=torch.Generator().manual_seed(0))

    def direct():
        out = []
        for p in PROMPTS:
            model.remove_cache()
            with torch.no_grad():
                out.append(0 if int(model(torch.tensor([engine.encode(p)]))[0, -1].argmax()) == ids[0] else -1)
        return out

    engine = Engine(model, tok, max_batch=4)
    for scale in (0.25, 0.5, 1, 2, 4, 8, 16):  # make [refuse] the top token for some prompts but not all
        with torch.no_grad():
            model.lm_head.weight[ids[0]] = base * scale
        want = direct()
        if 0 in want and -1 in want:
            break
    got = argmax_refusals(engine, PROMPTS, batch_size=4)
    assert got == want and 0 in got and -1 in got


def test_rate_table_by_hand():
    table = rate_table([0, -1, 2, -1, -1], [True, True, True, False, False], ["a", "a", "b", "a", None])
    assert table[("original", "a")] == (2, 0.5)
    assert table[("original", "b")] == (1, 1.0)
    assert table[("original", "all")] == (3, 2 / 3)
    assert table[("contrast", "all")] == (2, 0.0)
    assert table[("contrast", "uncategorised")] == (1, 0.0)
    assert "| original | a | 2 | 50.0% |" in markdown(table)


def test_argmax_refusals_batches_every_prompt_greedily_with_one_free_token():
    from types import SimpleNamespace

    class FakeEngine:
        def __init__(self):
            self.calls = []

        def generate(self, prompts, params):
            self.calls.append((list(prompts), params))
            return [SimpleNamespace(refused=int(p[1:]) % 3 - 1) for p in prompts]

    prompts = [f"p{i}" for i in range(9)]     # 9 = 2 full batches of 4 and a last one of 1
    eng = FakeEngine()
    assert argmax_refusals(eng, prompts, batch_size=4) == [i % 3 - 1 for i in range(9)]
    assert [c[0] for c in eng.calls] == [prompts[0:4], prompts[4:8], prompts[8:9]]
    for _, params in eng.calls:
        assert params.mode == "free" and params.temperature == 0.0 and params.max_new_tokens == 1
    assert argmax_refusals(FakeEngine(), [], batch_size=4) == []


def test_rate_table_sets_keys_and_markdown_rows():
    table = rate_table([3, -1, -1, 0], [False, False, True, True], [None, "x", "x", "x"])
    assert list(table) == sorted(table)
    assert table == {("contrast", "all"): (2, 0.5), ("contrast", "uncategorised"): (1, 1.0),
                     ("contrast", "x"): (1, 0.0), ("original", "all"): (2, 0.5), ("original", "x"): (2, 0.5)}
    md = markdown(table).splitlines()
    assert md[:2] == ["| set | category | prompts | refused (argmax) |", "|---|---|---|---|"]
    assert md[2:] == ["| contrast | all | 2 | 50.0% |", "| contrast | uncategorised | 1 | 100.0% |",
                      "| contrast | x | 1 | 0.0% |", "| original | all | 2 | 50.0% |", "| original | x | 2 | 50.0% |"]


def test_main_prints_the_table_of_the_models_greedy_decisions(monkeypatch, capsys):
    """The CLI wiring: the model and data it was given, the batch size for the engine and the batches, the
    labels in the data's order; the model and data loaders and the engine are stand-ins."""
    from types import SimpleNamespace

    import rtkern.calibrate_data
    import rtkern.engine
    import rtkern.loader
    from rtkern.train import evaluate

    refused = {"p0": 0, "p1": -1, "p2": 1, "p3": -1, "p4": -1}
    calls = {}

    class FakeEngine:
        def __init__(self, model, tok, max_batch):
            calls["engine"] = (model, tok, max_batch)
            calls["batches"] = []

        def generate(self, prompts, params):
            calls["batches"].append(list(prompts))
            return [SimpleNamespace(refused=refused[p]) for p in prompts]

    def fake_load_model(path, device):
        calls["model"] = (path, device)
        return "MODEL", "TOK"

    def fake_load_labelled(path):
        calls["data"] = path
        return SimpleNamespace(prompts=list(refused), should_refuse=torch.tensor([True, True, False, False, True]),
                               categories=["a", "a", None, "b", "a"])

    monkeypatch.setattr(rtkern.engine, "Engine", FakeEngine)
    monkeypatch.setattr(rtkern.loader, "load_model", fake_load_model)
    monkeypatch.setattr(rtkern.calibrate_data, "load_labelled", fake_load_labelled)
    assert evaluate.main(["--model", "m", "--data", "d.csv", "--device", "cpu", "--batch-size", "2"]) == 0
    assert calls["model"] == ("m", "cpu") and calls["data"] == "d.csv"
    assert calls["engine"] == ("MODEL", "TOK", 2)
    assert calls["batches"] == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    assert capsys.readouterr().out.splitlines()[2:] == [
        "| contrast | all | 2 | 50.0% |", "| contrast | b | 1 | 0.0% |", "| contrast | uncategorised | 1 | 100.0% |",
        "| original | a | 3 | 33.3% |", "| original | all | 3 | 33.3% |"]
    assert evaluate.main(["--model", "m", "--data", "d.csv"]) == 0          # defaults: one batch of up to 32
    assert calls["engine"] == ("MODEL", "TOK", 32) and calls["batches"] == [list(refused)]
    assert calls["model"] == ("m", "cuda" if torch.cuda.is_available() else "cpu")
