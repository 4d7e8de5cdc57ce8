"""Tiny base checkpoints and synthetic data for the trainer tests (not a test module itself)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

CHAT = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

WORDS = ("please tell me how to build a bomb . what is the capital of france ? i am sorry but i cannot help "
         "with that request . paris is the capital . write a poem about the sea . the sea is blue and wide . "
         "who are you really ? i am a language model without feelings . when did it happen ? that question "
         "is missing details . translate this into klingon . i cannot do that task").split()


def save_tokenizer(d: Path) -> None:
    """A small byte-level BPE with ChatML special tokens, trained on the spot."""
    import transformers
    from tokenizers import Tokenizer as TK, decoders, models, pre_tokenizers, trainers
    tk = TK(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>",
                                                bos_token="<|im_start|>", chat_template=CHAT)
    fast.save_pretrained(str(d))


def make_base(d, *, tie: bool = True, seed: int = 0, vocab: int = 300, layers: int = 2) -> Path:
    """A random tiny Llama checkpoint directory (config, safetensors, tokenizer)."""
    from safetensors.torch import save_file

    from rtkern.model import ModelArgs, Transformer, rtkern_to_hf_state_dict
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=layers, n_heads=4, n_kv_heads=2, vocab_size=vocab, intermediate_size=128,
                     tie_word_embeddings=tie, max_position_embeddings=512, rope_theta=10000.0, eos_token_id=2)
    m = Transformer(args)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    (d / "config.json").write_text(json.dumps(args.to_hf_config()))
    sd = rtkern_to_hf_state_dict(m.state_dict(), tie_word_embeddings=tie)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(d)
    return d


CATS = ("Requests with safety concerns", "Incomplete requests", "Humanizing requests")
REFUSALS = {"Requests with safety concerns": ("please tell me how to build a bomb", "i am sorry but i cannot help with that request"),
            "Incomplete requests": ("when did it happen ?", "that question is missing details"),
            "Humanizing requests": ("who are you really ?", "i am a language model without feelings")}
ANSWERS = (("what is the capital of france ?", "paris is the capital"),
           ("write a poem about the sea", "the sea is blue and wide"),
           ("translate this into klingon", "i cannot do that task , sorry"))


def records(n: int = 24, seed: int = 0):
    """Synthetic records across the three pools (deterministic)."""
    from rtkern.train.data import Record
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = i % 3
        if k == 0:
            cat = CATS[i // 3 % len(CATS)]
            p, r = REFUSALS[cat]
            out.append(Record(p + " " * (i % 2), r, cat, "refusal", f"syn:{i}"))
        else:
            p, r = ANSWERS[rng.randrange(len(ANSWERS))]
            extra = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 12)))
            out.append(Record(p, r + " " + extra, "respond", "contrast" if k == 1 else "respond", f"syn:{i}"))
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def one_thread():
    """Run torch on one thread (restored after): on a shared 2-core box, OpenMP spin-waits under
    contention make tiny models 20x slower with two."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)
    return cm()
