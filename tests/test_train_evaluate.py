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
