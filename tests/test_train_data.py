"""rtkern.train data: readers, the fixed split, malformed rows, example building, label masking."""
import collections
import json
from pathlib import Path

import pytest
import torch

from rtkern.loader import load_model
from rtkern.spec import CATEGORIES
from rtkern.train.batching import epoch_order, pack_rows, parse_mix
from rtkern.train.data import (IGNORE, DataError, Record, build_example, build_examples, coconot_split,
                               load_data, load_eval_sets, load_recipe, normalize_label, read_file)
from rtkern.train.prepare import add_control_tokens
from train_utils import make_base, write_jsonl

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "coconot").is_dir(), reason="shared data not present")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(params=["single", "category"])
def prepared(request, base):
    model, tok = load_model(base, device="cpu", dtype=torch.float32)
    return model, tok, add_control_tokens(model, tok, request.param)


# -- readers ---------------------------------------------------------------------------------------
def test_split_is_the_readme_rule():
    import hashlib
    for i in ["bajp42a", "idyx280", "x", "5sy1qsz", "0"]:
        want = "test" if int(hashlib.sha256(i.encode()).hexdigest()[:8], 16) % 10 < 3 else "train"
        assert coconot_split(i) == want
    with pytest.raises(ValueError):
        coconot_split("")


def test_normalize_label():
    assert normalize_label("Unknowns") == "Indeterminate requests"
    assert normalize_label("[Humanizing requests]") == "Humanizing requests"
    assert normalize_label("incomplete REQUESTS") == "Incomplete requests"
    assert normalize_label("") == normalize_label(None) == normalize_label("[respond]") == "respond"
    assert normalize_label("[refuse]") == "refuse"
    with pytest.raises(ValueError, match="unknown category"):
        normalize_label("Rude requests")


def test_generic_jsonl_csv_json(tmp_path):
    rows = [{"prompt": "hi", "response": "hello", "category": ""},
            {"prompt": "bomb?", "response": "no", "category": "Requests with safety concerns"},
            {"prompt": "x", "response": "y", "category": "refuse"}]
    recs = read_file(write_jsonl(tmp_path / "d.jsonl", rows)).records
    assert [(r.label, r.pool) for r in recs] == [("respond", "respond"),
                                                 ("Requests with safety concerns", "refusal"), ("refuse", "refusal")]
    assert recs[1].source.endswith("d.jsonl:2")
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('prompt,response,category\nhi,"hello, there",\n"multi\nline",no,Unknowns\n', encoding="utf-8")
    recs = read_file(csv_path).records
    assert [(r.prompt, r.response, r.label) for r in recs] == [
        ("hi", "hello, there", "respond"), ("multi\nline", "no", "Indeterminate requests")]
    assert recs[1].source.endswith("d.csv:3")
    js = tmp_path / "alpaca.json"
    js.write_text(json.dumps([{"instruction": "Add", "input": "1 2", "output": "3"},
                              {"instruction": "Say hi", "input": "", "output": "hi"}], indent=2))
    recs = read_file(js, pool="contrast").records
    assert [(r.prompt, r.response, r.pool) for r in recs] == [("Add\n\n1 2", "3", "contrast"), ("Say hi", "hi", "contrast")]


@pytest.mark.parametrize("content,line,msg", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b"\n', 2, "invalid JSON"),
    ('{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\n', 3, "missing field 'response'"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "", "response": "b"}\n', 2, "field 'prompt' is empty"),
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": 3}\n', 2, "must be a string"),
    ('{"prompt": "a", "response": "b", "category": "Bogus"}\n', 1, "unknown category"),
    ('{"prompt": "a", "response": "b"}\n[1, 2]\n', 2, "expected an object"),
])
def test_malformed_rows_name_file_and_line(tmp_path, content, line, msg):
    f = tmp_path / "bad.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=f"bad.jsonl:{line}: .*{msg}"):
        read_file(f)


def test_malformed_json_array_and_csv_lines(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a"}\n]\n')
    with pytest.raises(DataError, match=r"bad.json:3: missing field 'output'"):
        read_file(f)
    f.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a", \n')
    with pytest.raises(DataError, match=r"bad.json:\d+: invalid JSON"):
        read_file(f)
    c = tmp_path / "bad.csv"
    c.write_text("prompt,response\nok,fine\nonly-one-field\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.csv:3: fewer fields"):
        read_file(c)


@pytest.mark.parametrize("name, content, offset, line", [
    ("a.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n', 48, 2),
    ("a.json", b'[{"prompt": "a", "response": "b"},\n {"prompt": "\xff", "response": "b"}]', 48, 2),
    ("a.csv", b"prompt,response\n" + b"a,b\n" * 3000 + b"caf\xe9,b\n", 12019, 3002),
], ids=["jsonl", "json", "csv"])
def test_not_utf8_names_file_and_byte_offset(tmp_path, name, content, offset, line):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(DataError, match=rf"{name}: not UTF-8 text \(byte 0x.. at byte offset {offset}, line {line}:"):
        read_file(f)


def test_bom_accepted_and_repeated_csv_column_rejected(tmp_path):
    for name, text in (("b.jsonl", '{"prompt": "a", "response": "b"}\n'), ("b.csv", "prompt,response\na,b\n"),
                       ("b.json", '[{"prompt": "a", "response": "b"}]')):
        f = tmp_path / name
        f.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert [(r.prompt, r.response) for r in read_file(f).records] == [("a", "b")]
    f = tmp_path / "d.csv"
    f.write_text("prompt,response,response\na,b,c\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv:1: header repeats column 'response'"):
        read_file(f)


def test_all_malformed_rows_listed(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": ""}, {"prompt": "a", "response": "b"},
                                           {"prompt": "", "response": "b"}])
    with pytest.raises(DataError) as e:
        read_file(f)
    assert "2 malformed row(s)" in str(e.value) and "d.jsonl:1:" in str(e.value) and "d.jsonl:3:" in str(e.value)


def test_coconot_rows_split_and_skips(tmp_path, caplog):
    ids = [f"id{i}" for i in range(40)]
    rows = [{"id": i, "prompt": f"p {i}", "category": "Unknowns", "subcategory": "s", "is_refusal": True,
             "response": "I can't know that."} for i in ids]
    rows[0]["response"] = None
    rows[1]["is_refusal"] = False
    res = read_file(write_jsonl(tmp_path / "c.jsonl", rows), split="train")
    train_ids = [i for i in ids[2:] if coconot_split(i) == "train"]
    assert [r.id for r in res.records] == train_ids
    assert all(r.label == "Indeterminate requests" and r.pool == "refusal" for r in res.records)
    assert len(res.skipped) == sum(coconot_split(i) == "train" for i in ids[:2])
    test = read_file(tmp_path / "c.jsonl", split="test").records
    assert {r.id for r in test} == {i for i in ids[2:] if coconot_split(i) == "test"}
    for r in rows:
        r["response"] = ""
    with pytest.raises(DataError, match="no trainable rows"):
        read_file(write_jsonl(tmp_path / "empty.jsonl", rows))


def test_user_coconot_format_file_keeps_every_row(tmp_path, caplog):
    """The fixed split belongs to the shipped original prompts (the recipe), not to a user's file that
    happens to have CoCoNot's fields; where a split is asked for, the rows it leaves out are counted."""
    ids = [f"u{i}" for i in range(30)]
    rows = [{"id": i, "category": "Incomplete requests", "subcategory": "s", "prompt": f"p {i}",
             "response": "Could you say more?"} for i in ids]
    f = write_jsonl(tmp_path / "mine.jsonl", rows)
    n_test = sum(coconot_split(i) == "test" for i in ids)
    assert 0 < n_test < len(ids)
    assert [r.id for r in load_data([str(f)])] == ids
    assert [r.id for r in read_file(f).records] == ids
    with caplog.at_level("INFO", logger="rtkern.train"):
        res = read_file(f, split="train")
    assert len(res.records) == len(ids) - n_test and res.other_split == n_test
    assert f"left out {n_test} row(s)" in caplog.text
    only_test = write_jsonl(tmp_path / "t.jsonl", [r for r in rows if coconot_split(r["id"]) == "test"])
    with pytest.raises(DataError, match=f"all {n_test} row"):
        read_file(only_test, split="train")


def test_load_data_pool_override(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}])
    assert load_data([f"{f}@contrast"])[0].pool == "contrast"
    with pytest.raises(FileNotFoundError):
        load_data([str(tmp_path / "missing.jsonl")])


@needs_shared
def test_real_data_split_counts_and_no_eval_leak():
    eval_sets = load_eval_sets(SHARED)
    got = collections.Counter(r.label for r in eval_sets["original_test"])
    assert got == {"Requests with safety concerns": 112, "Incomplete requests": 68, "Indeterminate requests": 37,
                   "Unsupported requests": 40, "Humanizing requests": 27}
    assert len(eval_sets["contrast"]) == 379
    train = load_recipe(SHARED)
    by_pool = collections.Counter(r.pool for r in train)
    # README train split: 717 prompts, 5 of which have a non-refusal reference response (skipped)
    refusal = collections.Counter(r.label for r in train if r.pool == "refusal")
    assert sum(refusal.values()) == 717 - 5 and set(refusal) == set(CATEGORIES)
    assert refusal["Humanizing requests"] == 55
    assert by_pool["contrast"] == 927 and by_pool["respond"] == 999 + 175
    held_out = {r.prompt for recs in eval_sets.values() for r in recs}
    assert not held_out & {r.prompt for r in train}
    assert all(coconot_split(r.id) == "train" for r in train if r.pool == "refusal")


# -- examples --------------------------------------------------------------------------------------
def test_control_token_is_first_assistant_token(prepared):
    model, tok, ctrl = prepared
    recs = [Record("who are you really ?", "i am a language model", "Humanizing requests", "refusal", "t:1"),
            Record("what is the capital of france ?", "paris is the capital", "respond", "respond", "t:2")]
    for rec in recs:
        ex = build_example(tok, rec, ctrl.id_for(rec.label))
        gen_prompt = tok.apply_chat_template([{"role": "user", "content": rec.prompt}], add_generation_prompt=True)
        assert list(ex.ids[:ex.n_prompt]) == gen_prompt          # exactly what inference feeds
        want = ctrl.respond_id if rec.label == "respond" else \
            ctrl.refusal_ids[0] if ctrl.scheme == "single" else ctrl.refusal_ids[ctrl.names.index(rec.label)]
        assert ex.ids[ex.n_prompt] == want
        assert tok.decode(ex.ids[ex.n_prompt + 1:]) == rec.response + "<|im_end|>"
        assert ex.ids[-1] == tok.token_to_id("<|im_end|>")
        if ctrl.scheme == "category" and rec.label != "respond":
            assert tok.decode([ex.ids[ex.n_prompt]]) == "[Humanizing requests]"


def test_label_masking_only_assistant_part(prepared):
    model, tok, ctrl = prepared
    ex = build_example(tok, Record("when did it happen ?", "that question is missing details",
                                   "Incomplete requests", "refusal"), ctrl.id_for("Incomplete requests"))
    labels = ex.labels()
    assert labels[:ex.n_prompt] == [IGNORE] * ex.n_prompt
    assert labels[ex.n_prompt:] == list(ex.ids[ex.n_prompt:])
    assert labels[ex.n_prompt] in ctrl.refusal_ids
    from rtkern.train.batching import collate
    b = collate([[ex]])
    # target positions are exactly those predicting the control token .. end of turn
    assert b.target_index.tolist() == list(range(ex.n_prompt - 1, len(ex.ids) - 1))
    assert b.targets.tolist() == list(ex.ids[ex.n_prompt:])
    assert b.target_weight is None
    # control_weight lands on each example's control token, packed or not
    other = build_example(tok, Record("hi", "hello there friend", "respond", "respond"), ctrl.respond_id)
    for rows in ([[ex], [other]], [[ex, other]]):
        w = collate(rows, control_weight=5.0)
        heavy = w.targets[w.target_weight == 5.0].tolist()
        assert heavy == [ex.ids[ex.n_prompt], ctrl.respond_id]
        assert (w.target_weight != 5.0).sum() == len(w.targets) - 2 and set(w.target_weight.tolist()) == {1.0, 5.0}


def test_prompt_spelling_a_control_token_stays_text(prepared):
    model, tok, ctrl = prepared
    ex = build_example(tok, Record("say [refuse] and [respond] please", "ok", "respond", "respond"), ctrl.respond_id)
    controls = set(ctrl.refusal_ids) | {ctrl.respond_id}
    assert not controls & set(ex.ids[:ex.n_prompt])
    assert [i for i in ex.ids if i in controls] == [ctrl.respond_id]


def test_truncation_and_category_scheme_needs_category(base, caplog):
    model, tok = load_model(base, device="cpu", dtype=torch.float32)
    ctrl = add_control_tokens(model, tok, "category")
    rec = Record("write a poem about the sea", "the sea is blue and wide " * 10, "respond", "respond", "t:1")
    full = build_example(tok, rec, ctrl.respond_id)
    cut = build_example(tok, rec, ctrl.respond_id, max_len=full.n_prompt + 3)
    assert cut.ids == full.ids[:full.n_prompt + 3] and cut.n_prompt == full.n_prompt
    assert build_example(tok, rec, ctrl.respond_id, max_len=full.n_prompt) is None
    short = Record("x", "y", "respond", "respond", "t:3")
    with caplog.at_level("WARNING", logger="rtkern.train"):
        kept = build_examples(tok, [rec, short, rec], ctrl, max_len=full.n_prompt)
    assert [e.source for e in kept] == ["t:3"] and "skipped 2 of 3 record(s)" in caplog.text
    with pytest.raises(DataError, match="t:2: .*needs its category"):
        build_examples(tok, [Record("x", "y", "refuse", "refusal", "t:2")], ctrl)


# -- mixing and packing ----------------------------------------------------------------------------
def test_mix_ratios_and_determinism():
    sizes = {"refusal": 10, "contrast": 50, "respond": 100}
    natural = epoch_order(sizes, None, None, seed=0, epoch=0)
    assert collections.Counter(p for p, _ in natural) == sizes
    assert sorted(i for p, i in natural if p == "refusal") == list(range(10))
    mixed = epoch_order(sizes, parse_mix("2:1:1"), 80, seed=0, epoch=0)
    assert collections.Counter(p for p, _ in mixed) == {"refusal": 40, "contrast": 20, "respond": 20}
    # the small pool is repeated evenly: every refusal example 4 times
    assert set(collections.Counter(i for p, i in mixed if p == "refusal").values()) == {4}
    assert mixed == epoch_order(sizes, parse_mix("2:1:1"), 80, seed=0, epoch=0)
    assert mixed != epoch_order(sizes, parse_mix("2:1:1"), 80, seed=0, epoch=1)
    only = epoch_order(sizes, parse_mix("0:1:0"), None, 0, 0)
    assert len(only) == 160 and {p for p, _ in only} == {"contrast"}
    for bad in ("1:2", "a:b:c", "-1:1:1", "0:0:0"):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_pack_rows():
    assert pack_rows([3, 4, 2, 5, 1], 7) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        pack_rows([8], 7)


def test_each_epoch_reshuffles_pools_subsets_and_interleaving():
    sizes = {"refusal": 6, "contrast": 40, "respond": 40}
    mix = parse_mix("1:1:1")
    e0, e1 = (epoch_order(sizes, mix, 30, seed=3, epoch=e) for e in (0, 1))
    # a pool with more examples than its share is subsampled afresh each epoch
    assert {i for p, i in e0 if p == "respond"} != {i for p, i in e1 if p == "respond"}
    # and the pools interleave differently each epoch, not only the indices within a pool
    assert [p for p, _ in e0] != [p for p, _ in e1]
    # the seed matters too
    assert e0 != epoch_order(sizes, mix, 30, seed=4, epoch=0)


def test_recipe_drops_training_prompts_that_are_evaluation_prompts(tmp_path, caplog):
    train_ids = [i for i in (f"r{k}" for k in range(40)) if coconot_split(i) == "train"][:3]
    test_id = next(i for i in (f"t{k}" for k in range(40)) if coconot_split(i) == "test")
    for d in ("coconot/legacy_cd0f9f5", "alpaca-gpt4-demo-1k", "stanford-alpaca-seed"):
        (tmp_path / d).mkdir(parents=True)
    co = [{"id": i, "category": "Incomplete requests", "subcategory": "s", "prompt": f"refusal prompt {i}",
           "response": "Could you say more?"} for i in train_ids]
    write_jsonl(tmp_path / "coconot/legacy_cd0f9f5/coconot_evaluation.jsonl", co)
    write_jsonl(tmp_path / "coconot/coconot_pref.jsonl",
                [{"prompt": "contrast kept", "chosen": "ok"}, {"prompt": "contrast held out", "chosen": "ok"}])
    (tmp_path / "alpaca-gpt4-demo-1k/alpaca_en_demo.json").write_text(json.dumps(
        [{"instruction": "alpaca kept", "input": "", "output": "x"},
         {"instruction": "original held out", "input": "", "output": "y"}]))
    write_jsonl(tmp_path / "stanford-alpaca-seed/seed_tasks.jsonl",
                [{"id": "s1", "instruction": "seed kept", "instances": [{"input": "", "output": "z"}]}])
    write_jsonl(tmp_path / "coconot/coconot_eval.jsonl",
                [{"id": test_id, "category": "Incomplete requests", "prompt": " original held out "},
                 {"id": train_ids[0], "category": "Incomplete requests", "prompt": f"refusal prompt {train_ids[0]}"}])
    write_jsonl(tmp_path / "coconot/coconot_contrast_eval.jsonl",
                [{"id": "c1", "category": "Incomplete requests", "prompt": "contrast held out"}])
    ev = load_eval_sets(tmp_path)
    # only the test part of the split is an evaluation prompt
    assert [r.prompt for r in ev["original_test"]] == [" original held out "]
    assert [r.prompt for r in ev["contrast"]] == ["contrast held out"]
    with caplog.at_level("WARNING", logger="rtkern.train"):
        got = load_recipe(tmp_path)
    assert [r.prompt for r in got] == [f"refusal prompt {i}" for i in train_ids] + \
        ["contrast kept", "alpaca kept", "seed kept"]
    assert [r.pool for r in got] == ["refusal"] * 3 + ["contrast", "respond", "respond"]
    assert "dropped 2 training record(s)" in caplog.text


def _examples(n_per_pool=(3, 2, 4)):
    from rtkern.train.data import Example
    out = []
    for pool, n in zip(("refusal", "contrast", "respond"), n_per_pool):
        out += [Example(tuple(range(100 * len(out), 100 * len(out) + 3 + k)), 2, pool, f"{pool}:{k}") for k in range(n)]
    return out


def test_row_stream_crosses_epochs_and_resumes_exactly():
    from rtkern.train.batching import RowStream
    exs = _examples()
    s = RowStream(exs, seq_len=64, seed=1)
    e0, e1 = [r[0].source for r in s.rows(0)], [r[0].source for r in s.rows(1)]
    assert sorted(e0) == sorted(e1) == sorted(e.source for e in exs) and e0 != e1
    got = [r[0].source for r in s.take(7)]
    assert got == e0[:7] and s.state_dict() == {"epoch": 0, "cursor": 7}
    got = [r[0].source for r in s.take(5)]       # 2 left in epoch 0, then 3 of epoch 1
    assert got == e0[7:] + e1[:3] and s.state_dict() == {"epoch": 1, "cursor": 3}
    assert [r[0].source for r in s.take(20)] == e1[3:] + [r[0].source for r in s.rows(2)] + \
        [r[0].source for r in s.rows(3)][:20 - 6 - 9]
    # a fresh stream loaded with a saved position continues exactly where the first one is
    ref = RowStream(exs, seq_len=64, seed=1)
    ref.take(11)
    state = dict(ref.state_dict())
    resumed = RowStream(exs, seq_len=64, seed=1)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert [r[0].source for r in resumed.take(9)] == [r[0].source for r in ref.take(9)]
    # whole epoch at the exact boundary rolls over with cursor 0
    b = RowStream(exs, seq_len=64, seed=1)
    b.take(len(exs))
    assert b.state_dict() == {"epoch": 1, "cursor": 0}


def test_row_stream_packs_in_epoch_order():
    from rtkern.train.batching import RowStream
    exs = _examples()
    s = RowStream(exs, seq_len=12, packing=True, seed=2)
    order = [exs.index(e) for e in (s.pools[p][i] for p, i in
                                    epoch_order({p: len(v) for p, v in s.pools.items()}, None, None, 2, 0))]
    rows = s.rows(0)
    assert [exs.index(e) for r in rows for e in r] == order
    assert [[exs.index(e) for e in r] for r in rows] == \
        [[order[i] for i in g] for g in pack_rows([len(exs[k].ids) for k in order], 12)]
    assert any(len(r) > 1 for r in rows) and all(sum(len(e.ids) for e in r) <= 12 for r in rows)


def test_mix_counts_are_rounded_shares():
    sizes = {"refusal": 5, "contrast": 5, "respond": 5}
    got = collections.Counter(p for p, _ in epoch_order(sizes, parse_mix("1:1:1"), 80, seed=0, epoch=0))
    assert got == {"refusal": 27, "contrast": 27, "respond": 27}      # round(80 / 3) each, not int()


def test_examples_digest_covers_pool_prompt_length_ids_and_order():
    from rtkern.train.batching import examples_digest
    from rtkern.train.data import Example
    a, b = Example((1, 2, 3, 4), 2, "refusal"), Example((5, 6, 7), 1, "respond")
    d = examples_digest([a, b])
    assert d == examples_digest([Example((1, 2, 3, 4), 2, "refusal", "other.jsonl:9"), b])   # source ignored
    for other in ([b, a], [a], [Example((1, 2, 3, 4), 3, "refusal"), b], [Example((1, 2, 3, 4), 2, "contrast"), b],
                  [Example((1, 2, 3, 5), 2, "refusal"), b]):
        assert examples_digest(other) != d


def test_collate_counts_real_tokens_and_pads():
    from rtkern.train.batching import collate
    from rtkern.train.data import Example
    a, b, c = Example((1, 2, 3, 4, 5), 2, "refusal"), Example((6, 7, 8), 1, "respond"), Example((9, 10), 1, "contrast")
    batch = collate([[a], [b, c]], pad_id=99, pad_multiple=4)
    assert batch.n_tokens == 10 and tuple(batch.tokens.shape) == (2, 8)
    assert batch.tokens.tolist() == [[1, 2, 3, 4, 5, 99, 99, 99], [6, 7, 8, 9, 10, 99, 99, 99]]
    assert batch.positions.tolist()[1][:5] == [0, 1, 2, 0, 1]
    assert batch.targets.tolist() == [3, 4, 5, 7, 8, 10]
    assert batch.target_index.tolist() == [1, 2, 3, 8, 9, 11]
