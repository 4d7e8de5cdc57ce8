"""rtkern.train.checkpoint: HF-compatible directories (transformers and rtkern load them), atomic
writes, keep-last-N, trainer state without pickle."""
import json

import pytest
import torch

from rtkern.loader import load_model
from rtkern.spec import RefusalSpec
from rtkern.train import checkpoint as ck
from rtkern.train.prepare import add_control_tokens
from train_utils import make_base, one_thread

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _prepared(tmp_path, tie, scheme="category"):
    model, tok = load_model(make_base(tmp_path / "base", tie=tie), device="cpu", dtype=torch.float32)
    ctrl = add_control_tokens(model, tok, scheme)
    with torch.no_grad():   # stand-in for training: the new rows must survive the round trip
        model.embed_tokens.weight[ctrl.respond_id] += 0.3
        if not tie:
            model.lm_head.weight[ctrl.refusal_ids[0]] -= 0.2
    return model, tok, ctrl


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_through_transformers_and_rtkern(tmp_path, tie):
    model, tok, ctrl = _prepared(tmp_path, tie)
    d = ck.save_checkpoint(tmp_path / "ckpt", model, tok, ctrl)
    assert {"config.json", "model.safetensors", "tokenizer.json", "rtkern.json", "generation_config.json"} <= \
        {p.name for p in d.iterdir()}
    prompt = tok.apply_chat_template([{"role": "user", "content": "who are you really ?"}])
    x = torch.tensor([prompt + [ctrl.respond_id, ctrl.refusal_ids[2]]])
    with torch.no_grad():
        ours = model(x)

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True, dtype=torch.float32).eval()
    assert hf.config.vocab_size == model.args.vocab_size == 320 and hf.config.tie_word_embeddings == tie
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours, atol=1e-5, rtol=0)
    hft = transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    assert hft.convert_tokens_to_ids("[respond]") == ctrl.respond_id
    assert hft.convert_tokens_to_ids("[Unsupported requests]") == ctrl.refusal_ids[4]
    assert {"[respond]", "[Humanizing requests]"} <= {t.content for t in hft.added_tokens_decoder.values() if t.special}
    assert hft.apply_chat_template([{"role": "user", "content": "who are you really ?"}], tokenize=False,
                                   add_generation_prompt=True) == tok.render_chat(
        [{"role": "user", "content": "who are you really ?"}])

    import rtkern
    m2, t2 = rtkern.load_model(d, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), ours, atol=0, rtol=0)
    assert (m2.lm_head.weight is m2.embed_tokens.weight) == tie
    spec = RefusalSpec.from_tokenizer(t2, "category", require_respond=True)
    assert spec.refusal_ids == ctrl.refusal_ids and spec.respond_id == ctrl.respond_id
    # the reloaded tokenizer knows its control tokens: text spelling them stays text
    assert not set(t2.encode("[respond] [Humanizing requests]")) & set(ctrl.refusal_ids + (ctrl.respond_id,))
    assert ck.load_control_tokens(d) == ctrl
    meta = json.loads((d / "rtkern.json").read_text())
    assert meta["scheme"] == "category" and meta["categories"][0] == "Humanizing requests"


def test_saves_a_model_whose_weights_the_fused_decode_path_made_views(tmp_path):
    from rtkern import fused_decode
    model, tok, ctrl = _prepared(tmp_path, tie=False)
    model.setup_cache(1, 8)
    fused_decode.prepare(model)     # q/k/v and gate/up weights now share storage
    model.remove_cache()
    d = ck.save_checkpoint(tmp_path / "ckpt", model, tok, ctrl)
    m2, _ = load_model(d, device="cpu", dtype=torch.float32)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[k], v, rtol=0, atol=0)


def test_atomic_replace_and_failed_write_keeps_old(tmp_path, monkeypatch):
    model, tok, ctrl = _prepared(tmp_path, True, "single")
    d = ck.save_checkpoint(tmp_path / "out" / "c", model, tok, ctrl, state={"step": 1}, tensors={"x": torch.ones(2)})
    ck.save_checkpoint(d, model, tok, ctrl, state={"step": 2}, tensors={"x": torch.zeros(2)})
    assert json.loads((d / ck.STATE_JSON).read_text())["step"] == 2

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck, "write_model_files", boom)
    with pytest.raises(OSError):
        ck.save_checkpoint(d, model, tok, ctrl, state={"step": 3})
    assert json.loads((d / ck.STATE_JSON).read_text())["step"] == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c"]        # no temp dirs left


def test_trainer_state_loads_without_pickle(tmp_path, monkeypatch):
    model, tok, ctrl = _prepared(tmp_path, True, "single")
    opt = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    d = ck.save_checkpoint(tmp_path / "c", model, tok, ctrl, state={"step": 5},
                           tensors={"optimizer": opt.state_dict(), "rng_cpu": torch.get_rng_state()})
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw.get("weights_only")) or real_load(*a, **kw))
    state, tensors = ck.load_trainer_state(d)
    assert loads == [True]
    assert state["step"] == 5 and set(tensors) == {"optimizer", "rng_cpu"}
    opt2 = torch.optim.AdamW(model.parameters())
    opt2.load_state_dict(tensors["optimizer"])
    for k, v in opt.state_dict()["state"][0].items():
        torch.testing.assert_close(opt2.state_dict()["state"][0][k], v, rtol=0, atol=0)
    torch.testing.assert_close(tensors["rng_cpu"], torch.get_rng_state(), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="not a resumable"):
        ck.load_trainer_state(tmp_path / "base")


def test_keep_last_n(tmp_path):
    for s in (3, 10, 7, 12):
        p = tmp_path / ck.checkpoint_name(s)
        p.mkdir()
        (p / ck.STATE_JSON).write_text("{}")
    (tmp_path / "checkpoint-0000099").mkdir()          # incomplete: ignored, never counted
    (tmp_path / "final").mkdir()
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [ck.checkpoint_name(s) for s in (3, 7, 10, 12)]
    gone = ck.prune_checkpoints(tmp_path, 2)
    assert [p.name for p in gone] == [ck.checkpoint_name(3), ck.checkpoint_name(7)]
    assert ck.latest_checkpoint(tmp_path).name == ck.checkpoint_name(12)
    assert (tmp_path / "final").is_dir() and ck.prune_checkpoints(tmp_path, 0) == []


def _sentencepiece_base(tmp_path, model_type):
    """A tiny base whose tokenizer is a sentencepiece ``tokenizer.model`` only (no tokenizer.json),
    trained here on synthetic lines; ChatML markers are sentencepiece control pieces."""
    import io
    import random

    import sentencepiece as spm
    from train_utils import CHAT, WORDS
    base = make_base(tmp_path / "base", tie=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (base / name).unlink(missing_ok=True)
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 15))) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type=model_type,
                                   vocab_size=120, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, control_symbols=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                   minloglevel=2, num_threads=1)
    (base / "tokenizer.model").write_bytes(buf.getvalue())
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT}))
    return base


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_only_tokenizer_round_trip(tmp_path, model_type):
    """A sentencepiece-only base saves as tokenizer.model + tokenizer_config.json: rtkern reloads the same
    tokenizer and control ids, and transformers loads it with each control token one special id."""
    model, tok = load_model(_sentencepiece_base(tmp_path, model_type), device="cpu", dtype=torch.float32)
    assert tok._sp is not None
    ctrl = add_control_tokens(model, tok, "category")
    d = ck.save_checkpoint(tmp_path / "ckpt", model, tok, ctrl)
    names = {p.name for p in d.iterdir()}
    assert {"tokenizer.model", "tokenizer_config.json", "rtkern.json"} <= names and "tokenizer.json" not in names
    chat = [{"role": "user", "content": "who are you really ?"}, {"role": "assistant", "content": "paris"}]
    texts = [tok.render_chat(chat), "what is the capital of france ?  i cannot help <s>x", "klingon é"]

    import rtkern
    m2, t2 = rtkern.load_model(d, device="cpu", dtype=torch.float32)
    assert t2._sp is not None and t2.render_chat(chat) == texts[0]
    spec = RefusalSpec.from_tokenizer(t2, "category", require_respond=True)
    assert spec.refusal_ids == ctrl.refusal_ids and spec.respond_id == ctrl.respond_id
    assert [t2.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    torch.testing.assert_close(m2.embed_tokens.weight, model.embed_tokens.weight, atol=0, rtol=0)

    hft = transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    controls = list(ctrl.refusal_tokens) + [ctrl.respond_token]
    assert hft.convert_tokens_to_ids(controls) == list(ctrl.refusal_ids) + [ctrl.respond_id]
    # the control tokens are special: one id each, even inside text, and skipped when decoding
    ids = hft.encode("[respond]paris [Humanizing requests]", add_special_tokens=False)
    assert ids[0] == ctrl.respond_id and ids[-1] == ctrl.refusal_ids[ctrl.names.index("Humanizing requests")]
    assert ids[1:-1] == tok.encode("paris ")
    assert hft.decode(ids, skip_special_tokens=True).strip() == "paris"
    assert {"[respond]", "[Humanizing requests]"} <= {t.content for t in hft.added_tokens_decoder.values() if t.special}
    # ordinary text and the chat markers tokenize as rtkern does
    assert [hft.encode(t, add_special_tokens=False) for t in texts] == [tok.encode(t) for t in texts]
    assert hft.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == texts[0]


def test_sentencepiece_save_refuses_added_tokens_out_of_order(tmp_path):
    model, tok = load_model(_sentencepiece_base(tmp_path, "unigram"), device="cpu", dtype=torch.float32)
    tok.add_control_tokens(["[respond]"])          # first, so it would not get the id rtkern.json implies
    ctrl = add_control_tokens(model, tok, "single")
    with pytest.raises(ValueError, match="not the control tokens in order"):
        ck.save_checkpoint(tmp_path / "ckpt", model, tok, ctrl)


def test_checkpoint_names_sort_by_step_and_only_complete_ones_count(tmp_path):
    assert ck.checkpoint_name(12) == "checkpoint-0000012"
    assert ck.latest_checkpoint(tmp_path / "missing") is None and ck.list_checkpoints(tmp_path / "missing") == []
    assert ck.latest_checkpoint(tmp_path) is None and ck.prune_checkpoints(tmp_path, 1) == []
    for name in ("checkpoint-9", "checkpoint-0000010", "checkpoint-100"):   # steps beyond the padding too
        (tmp_path / name).mkdir()
        (tmp_path / name / ck.STATE_JSON).write_text("{}")
    (tmp_path / "checkpoint-0000200").mkdir()                          # no trainer state: incomplete
    (tmp_path / "checkpoint-300").write_text("")                       # a file, not a directory
    (tmp_path / "checkpoint-x").mkdir()
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-0000010", "checkpoint-100"]
    assert ck.latest_checkpoint(tmp_path).name == "checkpoint-100"
    assert [p.name for p in ck.prune_checkpoints(tmp_path, 1)] == ["checkpoint-9", "checkpoint-0000010"]
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["checkpoint-100"]
    assert (tmp_path / "checkpoint-0000200").is_dir()                  # never pruned: not a checkpoint
    assert ck.prune_checkpoints(tmp_path, 5) == []


def test_metrics_log_resume_keeps_records_up_to_the_checkpoint(tmp_path):
    from rtkern.train.metrics import MetricsLog, read_metrics
    f = tmp_path / "m" / "metrics.jsonl"
    log = MetricsLog(f)
    for s in (1, 2, 3, 4):
        log.write({"step": s, "loss": float(s)})
    with open(f, "a") as fh:
        fh.write('{"step": 5, "lo')                                     # torn line of a killed run
    assert [r["step"] for r in read_metrics(f)] == [1, 2, 3, 4]
    MetricsLog(f, resume_step=3).write({"step": 4, "loss": 0.5})
    assert read_metrics(f) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0},
                               {"step": 4, "loss": 0.5}]
    assert not list(f.parent.glob("*.tmp"))
    MetricsLog(f)                                                       # a fresh run starts a fresh file
    assert not f.exists()
    f.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    assert [r["step"] for r in read_metrics(f)] == [1, 2]


def test_config_dtype_generation_config_and_the_weights_given(tmp_path):
    """config.json records the weights' dtype; generation_config.json the tokenizer's bos and eos ids; an
    explicit state_dict (what FSDP gathers) is what gets written, not the model's own weights."""
    from safetensors.torch import load_file
    model, tok, ctrl = _prepared(tmp_path, tie=False, scheme="single")
    d = ck.save_checkpoint(tmp_path / "c", model, tok, ctrl)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    assert tok.bos_id is not None and [tok.bos_id] != list(tok.eos_ids)
    assert json.loads((d / "generation_config.json").read_text()) == {"bos_token_id": tok.bos_id,
                                                                      "eos_token_id": list(tok.eos_ids)}
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sd["embed_tokens.weight"][ctrl.respond_id] += 5.0
    d = ck.save_checkpoint(tmp_path / "c", model.to(torch.bfloat16), tok, ctrl,
                           state_dict={k: v.to(torch.bfloat16) for k, v in sd.items()})
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == "bfloat16"
    saved = load_file(str(d / "model.safetensors"))
    torch.testing.assert_close(saved["model.embed_tokens.weight"], sd["embed_tokens.weight"].to(torch.bfloat16),
                               rtol=0, atol=0)
    assert not torch.equal(saved["model.embed_tokens.weight"], model.embed_tokens.weight.detach())
    with pytest.raises(ValueError, match="state_dict has no 'embed_tokens.weight'"):
        ck.save_checkpoint(tmp_path / "bad", model, tok, ctrl, state_dict={"norm.weight": torch.ones(2)})
    assert not (tmp_path / "bad").exists()


def test_a_tokenizer_with_more_ids_than_the_model_is_not_saved(tmp_path):
    model, tok = load_model(make_base(tmp_path / "base"), device="cpu", dtype=torch.float32)
    ctrl = add_control_tokens(model, tok, "single")       # 302 ids, 320 rows
    tok.add_control_tokens([f"[x{i}]" for i in range(19)])
    assert tok.vocab_size == 321
    with pytest.raises(ValueError, match="tokenizer has 321 ids, the model only 320 rows"):
        ck.save_checkpoint(tmp_path / "c", model, tok, ctrl)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_gguf_style_tokenizer_keeps_its_chat_template(tmp_path):
    """A tokenizer whose chat template lives outside the Hugging Face object (as GGUF-derived ones) saves it."""
    model, tok, ctrl = _prepared(tmp_path, tie=True, scheme="single")
    template = tok.chat_template
    tok._hf.chat_template = None
    assert template and tok.chat_template == template
    d = ck.save_checkpoint(tmp_path / "c", model, tok, ctrl)
    assert transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True).chat_template == template


def test_broken_control_file_and_incomplete_trainer_state(tmp_path):
    (tmp_path / ck.CONTROL_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="rtkern.json: invalid JSON"):
        ck.load_control_tokens(tmp_path)
    (tmp_path / ck.CONTROL_FILE).write_text('{"scheme": "single"}')
    with pytest.raises(ValueError, match="malformed rtkern.json"):
        ck.load_control_tokens(tmp_path)
    (tmp_path / ck.STATE_JSON).write_text('{"step": 1}')            # the tensors file is missing
    with pytest.raises(FileNotFoundError, match=r"not a resumable checkpoint \(no trainer_state.pt\)"):
        ck.load_trainer_state(tmp_path)


def test_only_exact_checkpoint_names_count(tmp_path):
    for name in ("checkpoint-5", "checkpoint-7.bak", "checkpoint-8-old", "xcheckpoint-9"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ck.STATE_JSON).write_text("{}")
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["checkpoint-5"]
    assert ck.latest_checkpoint(tmp_path).name == "checkpoint-5"


def test_sentencepiece_config_declares_unknown_control_pieces_and_the_template(tmp_path):
    """By hand for the tiny unigram model (unk 0, bos 1, eos 2, ChatML markers 3..5 as control pieces)."""
    model, tok = load_model(_sentencepiece_base(tmp_path, "unigram"), device="cpu", dtype=torch.float32)
    ctrl = add_control_tokens(model, tok, "single")
    n = tok._sp.sp.get_piece_size()
    assert ctrl.refusal_ids == (n,) and ctrl.respond_id == n + 1
    cfg = ck.sentencepiece_tokenizer_config(tok, ctrl)
    assert (cfg["unk_token"], cfg["bos_token"], cfg["eos_token"]) == ("<unk>", "<s>", "</s>")
    want = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "<|endoftext|>", 4: "<|im_start|>", 5: "<|im_end|>",
            n: "[refuse]", n + 1: "[respond]"}
    assert {int(i): t["content"] for i, t in cfg["added_tokens_decoder"].items()} == want
    assert all(t["special"] and not t["normalized"] for t in cfg["added_tokens_decoder"].values())
    assert cfg["extra_special_tokens"] == ["[refuse]", "[respond]"]
    assert cfg["chat_template"] == tok.chat_template and "im_start" in cfg["chat_template"]


def test_metrics_peak_memory_units_and_plot(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from rtkern.train import metrics
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 0, "event": "start"}\n')
    assert metrics.plot_loss(f, tmp_path / "a.png") is None and not (tmp_path / "a.png").exists()
    f.write_text('{"step": 0, "event": "start"}\n{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 2, "loss": 1.5, "lr": 0.2}\n')
    png = metrics.plot_loss(f, tmp_path / "b.png")
    assert png == tmp_path / "b.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setattr(metrics.resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=3 * 2**20))
    monkeypatch.setattr(metrics.sys, "platform", "linux")                   # ru_maxrss in KiB
    assert metrics.peak_memory_gb(torch.device("cpu")) == 3.0
    monkeypatch.setattr(metrics.sys, "platform", "darwin")                  # in bytes
    assert metrics.peak_memory_gb(torch.device("cpu")) == 3 / 1024


def test_saved_tensors_never_share_storage(tmp_path, monkeypatch):
    """safetensors before 0.6 refuses tensors that share storage (the fused q/k/v and gate/up views);
    whatever the installed version accepts, what reaches save_file owns its memory."""
    import safetensors.torch

    from rtkern import fused_decode
    model, tok, ctrl = _prepared(tmp_path, tie=False)
    model.setup_cache(1, 8)
    fused_decode.prepare(model)
    model.remove_cache()
    real = safetensors.torch.save_file

    def checked(tensors, *a, **kw):
        for k, v in tensors.items():
            assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), f"{k} shares its storage"
        return real(tensors, *a, **kw)
    monkeypatch.setattr(safetensors.torch, "save_file", checked)
    ck.save_checkpoint(tmp_path / "ckpt", model, tok, ctrl)


def test_empty_trainer_state_is_still_written_and_a_resume_at_step_0_drops_later_records(tmp_path):
    """An empty state and empty tensors are a (trivial) resumable checkpoint, not a missing one; a metrics
    log resumed at step 0 keeps only what precedes the first step."""
    from rtkern.train.metrics import MetricsLog, read_metrics
    model, tok, ctrl = _prepared(tmp_path, True, "single")
    d = ck.save_checkpoint(tmp_path / "out" / ck.checkpoint_name(0), model, tok, ctrl, state={}, tensors={})
    assert (d / ck.STATE_JSON).is_file() and (d / ck.STATE_TENSORS).is_file()
    assert ck.load_trainer_state(d) == ({}, {}) and ck.latest_checkpoint(tmp_path / "out") == d
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 0, "event": "start"}\n{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    MetricsLog(f, resume_step=0)
    assert read_metrics(f) == [{"step": 0, "event": "start"}]
