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
