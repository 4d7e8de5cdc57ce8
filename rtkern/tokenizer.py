"""Tokenizer wrapper: Hugging Face tokenizers (tokenizer.json, or a GGUF's embedded vocabulary) and
sentencepiece ``tokenizer.model``, with control tokens that user text can never produce."""
from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

# Tokens that end a turn in common chat formats; counted as EOS when the vocabulary has them.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>",
                "<end_of_turn>")


class Tokenizer:
    """``encode``/``decode``/``apply_chat_template`` over either backend.

    Control tokens (``add_control_tokens``) are special tokens: ``encode`` of any text, including text
    that spells ``[refuse]``, never returns their ids.
    """

    def __init__(self, backend, *, chat_template: str | None = None, eos_ids=(), bos_id: int | None = None):
        self._hf = None if isinstance(backend, _SentencePiece) else backend
        self._sp = backend if isinstance(backend, _SentencePiece) else None
        self.chat_template = chat_template or getattr(self._hf, "chat_template", None) or None
        self.control_ids: list[int] = []
        self.scheme: str | None = None  # "single"/"category" when the checkpoint's rtkern.json says so
        vocab = self.get_vocab()
        ids = set(int(i) for i in eos_ids if i is not None)
        tok_eos = self._hf.eos_token_id if self._hf is not None else self._sp.eos_id
        if tok_eos is not None and tok_eos >= 0:
            ids.add(int(tok_eos))
        special = set(self._special_strings())
        ids.update(vocab[t] for t in _END_OF_TURN if t in vocab and t in special)
        self.eos_ids: list[int] = sorted(ids)
        if bos_id is None:
            bos_id = self._hf.bos_token_id if self._hf is not None else self._sp.bos_id
        self.bos_id = bos_id if bos_id is None or bos_id >= 0 else None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path, *, eos_ids=(), chat_template: str | None = None) -> "Tokenizer":
        """tokenizer.json (+ tokenizer_config.json) via transformers, else sentencepiece tokenizer.model."""
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            from transformers import AutoTokenizer
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
            return cls(hf, chat_template=chat_template, eos_ids=eos_ids)
        if (path / "tokenizer.model").is_file():
            cfg = {}
            if (path / "tokenizer_config.json").is_file():
                cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
            if chat_template is None and (path / "chat_template.jinja").is_file():
                chat_template = (path / "chat_template.jinja").read_text(encoding="utf-8")
            chat_template = chat_template or cfg.get("chat_template")
            return cls(_SentencePiece(path / "tokenizer.model"), chat_template=chat_template, eos_ids=eos_ids)
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")

    @classmethod
    def from_gguf(cls, path, *, eos_ids=(), chat_template: str | None = None) -> "Tokenizer":
        """The vocabulary embedded in a GGUF file, converted by transformers (offline)."""
        from transformers import AutoTokenizer
        path = Path(path)
        try:
            hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True,
                                               trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"{path}: cannot build a tokenizer from the GGUF vocabulary: {e}") from e
        file_eos = [int(i) for i in eos_ids if i is not None]
        if file_eos and hf.eos_token_id not in file_eos:
            # transformers 5.17 (the GPU image's) converts a GGUF's eos as its bos token; the file's id wins
            hf.eos_token = hf.convert_ids_to_tokens(file_eos[0])
        return cls(hf, chat_template=chat_template, eos_ids=eos_ids)

    # -- vocabulary -------------------------------------------------------------------------------
    def get_vocab(self) -> dict[str, int]:
        return dict(self._hf.get_vocab()) if self._hf is not None else self._sp.get_vocab()

    @property
    def hf_tokenizer(self):
        """The transformers fast tokenizer behind this one (None for a sentencepiece ``tokenizer.model``).

        It does not keep control tokens out of user text: encode through this class for that.
        """
        return self._hf

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding may be larger)."""
        return len(self._hf) if self._hf is not None else self._sp.size()

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.get_vocab().get(token)

    def _special_strings(self) -> list[str]:
        if self._hf is not None:
            return [t.content for t in self._hf.added_tokens_decoder.values() if t.special]
        return self._sp.special_strings()

    def add_control_tokens(self, strings) -> list[int]:
        """Register ``strings`` as special tokens (new ids unless already special); return their ids."""
        strings = list(strings)
        vocab = self.get_vocab()
        special = set(self._special_strings())
        for s in strings:
            if s in vocab and s not in special:
                raise ValueError(f"control token {s!r} is an ordinary vocabulary entry (id {vocab[s]}); "
                                 "text could produce it")
        new = [s for s in strings if s not in vocab]
        if self._hf is not None:
            from tokenizers import AddedToken
            if new:
                self._hf.add_tokens([AddedToken(s, special=True, normalized=False, single_word=False,
                                                lstrip=False, rstrip=False) for s in new], special_tokens=True)
        else:
            self._sp.add_specials(new)
        vocab = self.get_vocab()
        ids = [vocab[s] for s in strings]
        self.control_ids = sorted(set(self.control_ids) | set(ids))
        return ids

    def protect(self, ids) -> None:
        """Make the special tokens among ``ids`` control tokens (text can no longer produce them).

        Ids of ordinary vocabulary entries (the paper's checkpoints use plain words) are left alone:
        that checkpoint's text produces them by design.
        """
        inverse = {i: s for s, i in self.get_vocab().items()}
        special = set(self._special_strings())
        strings = [inverse[i] for i in ids if i in inverse and inverse[i] in special]
        if strings:
            self.add_control_tokens(strings)

    # -- encode / decode --------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Text -> ids. Special tokens written in the text (e.g. ``<|im_start|>``) are recognised, as in
        transformers; control tokens never are."""
        [ids] = self.encode_batch([text])
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts) -> list[list[int]]:
        """`encode` of each text (no BOS added); a fast tokenizer encodes the batch in one call."""
        texts = list(texts)
        if self._hf is None:
            return [self._sp.encode(t, exclude=self.control_ids) for t in texts]
        rows = [list(r) for r in self._hf(texts, add_special_tokens=False)["input_ids"]] if texts else []
        ctrl = set(self.control_ids)
        return [r if ctrl.isdisjoint(r) else self._encode_hf(t) for t, r in zip(texts, rows)]

    def _encode_hf(self, text: str) -> list[int]:
        enc = self._hf(text, add_special_tokens=False, return_offsets_mapping=bool(self.control_ids))
        ids = list(enc["input_ids"])
        ctrl = set(self.control_ids)
        if not ctrl or ctrl.isdisjoint(ids):
            return ids
        # Rare path: the text spells a control token. Keep the other added tokens as anchors and
        # re-encode the text between them with every special token split into plain text.
        added = set(self._hf.added_tokens_decoder)
        out, cursor = [], 0
        for i, (s, e) in zip(ids, enc["offset_mapping"]):
            if i in added and i not in ctrl:
                out += self._plain(text[cursor:s])
                out.append(i)
                cursor = e
        out += self._plain(text[cursor:])
        return out

    def _plain(self, text: str) -> list[int]:
        if not text:
            return []
        ids = list(self._hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
        assert set(ids).isdisjoint(self.control_ids), "control token produced from plain text"
        return ids

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._sp.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages, add_generation_prompt: bool = True) -> str:
        return self.render_chat_batch([messages], add_generation_prompt)[0]

    def render_chat_batch(self, conversations, add_generation_prompt: bool = True) -> list[str]:
        """The chat template applied to each message list (text, not ids)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        conversations = [list(m) for m in conversations]
        if not conversations:
            return []
        if self._hf is not None:  # one call: transformers' per-call set-up is paid once
            return list(self._hf.apply_chat_template(conversations, tokenize=False, chat_template=self.chat_template,
                                                     add_generation_prompt=add_generation_prompt))
        return [_render_jinja(self.chat_template, m, add_generation_prompt, bos_token=self._sp.piece(self._sp.bos_id),
                              eos_token=self._sp.piece(self._sp.eos_id)) for m in conversations]

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Render with the checkpoint's chat template and tokenize (BOS comes from the template)."""
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def apply_chat_template_batch(self, conversations, add_generation_prompt: bool = True) -> list[list[int]]:
        """`apply_chat_template` of each message list, tokenized as one batch."""
        return self.encode_batch(self.render_chat_batch(conversations, add_generation_prompt))


def _render_jinja(template: str, messages, add_generation_prompt: bool, **extra) -> str:
    return _compile_jinja(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)


@functools.lru_cache(maxsize=16)
def _compile_jinja(template: str):
    # Compiling costs ~100 renders (~0.9 ms): once per template, as transformers does.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ValueError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


class _SentencePiece:
    """sentencepiece ``tokenizer.model``; added special tokens get ids after the model's pieces."""

    def __init__(self, path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: not a valid sentencepiece model: {e}") from e
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.added: dict[str, int] = {}
        self._split = None

    def size(self) -> int:
        return self.sp.get_piece_size() + len(self.added)

    def piece(self, i: int) -> str:
        return "" if i is None or i < 0 else self.sp.id_to_piece(i)

    def get_vocab(self) -> dict[str, int]:
        v = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}
        v.update(self.added)
        return v

    def _model_specials(self) -> dict[str, int]:
        n = self.sp.get_piece_size()
        return {self.sp.id_to_piece(i): i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}

    def special_strings(self) -> list[str]:
        return list(self._model_specials()) + list(self.added)

    def add_specials(self, strings):
        for s in strings:
            self.added.setdefault(s, self.size())

    def encode(self, text: str, exclude=()) -> list[int]:
        # Template markers such as <s> are recognised; added tokens and the model's own control symbols
        # in ``exclude`` (rtkern's control tokens) are not: they stay text.
        exclude = set(exclude)
        specials = {s: i for s, i in self._model_specials().items() if s and i not in exclude}
        if not specials:
            return list(self.sp.encode(text))
        pattern = re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")
        out = []
        for part in pattern.split(text):
            if part in specials:
                out.append(specials[part])
            elif part:
                out += self.sp.encode(part)
        return out

    def decode(self, ids, skip_special_tokens=False) -> str:
        inv = {i: s for s, i in self.added.items()}
        n = self.sp.get_piece_size()
        text, run = [], []
        for i in ids:
            if i < n:
                run.append(i)
                continue
            if run:
                text.append(self.sp.decode(run))
                run = []
            if not skip_special_tokens and i in inv:
                text.append(inv[i])
        if run:
            text.append(self.sp.decode(run))
        return "".join(text)


def find_eos_ids(path) -> list[int]:
    """eos_token_id(s) from config.json and generation_config.json in a checkpoint directory."""
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            try:
                v = json.loads(Path(f).read_text(encoding="utf-8")).get("eos_token_id")
            except (json.JSONDecodeError, AttributeError):
                continue
            ids += v if isinstance(v, list) else [v] if isinstance(v, int) else []
    return ids
