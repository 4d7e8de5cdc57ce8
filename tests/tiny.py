"""Tiny random Llama checkpoints and a tiny BPE tokenizer, made on the spot for tests."""
import torch
import transformers

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_hf(vocab=320, tie=False, seed=0, random_norms=False, **config):
    """A 2-layer GQA Llama; ``config`` overrides LlamaConfig fields, ``random_norms`` exercises the norm weights."""
    torch.manual_seed(seed)
    fields = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=vocab, tie_word_embeddings=tie, eos_token_id=1)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**fields, **config})).eval()
    return randomize_norms_(m) if random_norms else m


def randomize_norms_(model):
    """Norm weights uniform in [0.5, 1.5] (default init leaves them at 1, where a dropped norm goes unseen)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def save_tokenizer(d, vocab_size=300, control=()):
    """A small byte-level BPE with chat special tokens (and ``control`` special tokens), trained on the spot.

    Returns the transformers tokenizer that was saved.
    """
    from tokenizers import AddedToken, Tokenizer as TK, decoders, models, pre_tokenizers, trainers
    tk = TK(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_end|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(["please refuse this request", "respond to the user kindly", "hello world"] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>",
                                                bos_token="<|im_start|>", chat_template=CHAT)
    if control:
        fast.add_tokens([AddedToken(t, special=True, normalized=False) for t in control], special_tokens=True)
    fast.save_pretrained(d)
    return fast


def save_scoring_model(d, control, seed=0):
    """``tiny_hf`` with ``save_tokenizer(control=...)``, its control rows scaled so their probabilities vary."""
    fast = save_tokenizer(d, vocab_size=280, control=control)
    model = tiny_hf(seed=seed)
    with torch.no_grad():
        ids = [len(fast) - len(control) + i for i in range(len(control))]
        model.lm_head.weight[ids] *= 40
    model.save_pretrained(d)


def write_labelled_jsonl(path, n=12):
    """``n`` prompts alternating refuse / comply, categories cycling through CoCoNot's five."""
    import json
    from rtkern.spec import CATEGORIES
    words = ["hello", "please", "refuse", "respond", "kindly", "world", "user", "request"]
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": " ".join(words[(i + k) % 8] for k in range(1 + i % 5)),
                                 "label": "refuse" if i % 2 == 0 else "comply",
                                 "category": CATEGORIES[i % 5]}) + "\n")
    return path
