"""Tokenizers: a thin wrapper over Hugging Face ``tokenizers`` built from a tokenizer.json
or from the tokenizer stored in GGUF metadata (byte-level BPE, ``tokenizer.ggml.model == "gpt2"``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

__all__ = ["Tokenizer", "GGUFTokenizerMetadata", "build_tokenizer_from_gguf", "pre_tokenizer_for"]

# llama.cpp token types
TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 1, 2, 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def pre_tokenizer_for(pre: str | None):
    """The HF pre-tokenizer matching llama.cpp's ``tokenizer.ggml.pre`` value.

    * ``smollm`` (SmolLM/SmolLM2, StarCoder-style): individual digits, then GPT-2 byte-level regex.
    * ``gpt2`` / ``default`` / None: GPT-2 byte-level regex.
    * ``llama-bpe`` / ``llama3`` / ``smaug-bpe`` / ``dbrx``: Llama-3 split regex.
    * ``qwen2`` / ``deepseek-r1-qwen``: Qwen2 split regex.
    Unknown values fall back to GPT-2 with a warning.
    """
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    split = {
        "llama-bpe": _LLAMA3_SPLIT,
        "llama3": _LLAMA3_SPLIT,
        "llama-v3": _LLAMA3_SPLIT,
        "smaug-bpe": _LLAMA3_SPLIT,
        "dbrx": _LLAMA3_SPLIT,
        "qwen2": _QWEN2_SPLIT,
        "deepseek-r1-qwen": _QWEN2_SPLIT,
    }.get(pre or "")
    if split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre not in (None, "", "gpt2", "default", "gpt-2"):
        warnings.warn(f"unknown GGUF pre-tokenizer {pre!r}; falling back to the GPT-2 byte-level regex")
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


@dataclasses.dataclass
class GGUFTokenizerMetadata:
    """The ``tokenizer.ggml.*`` fields of a GGUF file."""

    model: str  # tokenizer.ggml.model, e.g. "gpt2" (byte-level BPE)
    pre: str | None  # tokenizer.ggml.pre, e.g. "smollm"
    tokens: list[str]
    merges: list[str]
    token_type: list[int] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    unk_token_id: int | None = None
    add_bos_token: bool = False
    chat_template: str | None = None


def build_tokenizer_from_gguf(meta: GGUFTokenizerMetadata) -> HFTokenizer:
    """A ``tokenizers.Tokenizer`` (byte-level BPE) from GGUF tokenizer metadata."""
    if meta.model != "gpt2":
        raise NotImplementedError(
            f"GGUF tokenizer model {meta.model!r} is not supported; only byte-level BPE ('gpt2') is"
        )
    vocab = {tok: i for i, tok in enumerate(meta.tokens)}
    merges = []
    for m in meta.merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ValueError(f"malformed GGUF merge {m!r}")
        merges.append((a, b))
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizer_for(meta.pre)
    tk.decoder = decoders.ByteLevel()
    if meta.token_type is not None:
        control = [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(meta.tokens, meta.token_type)
            if ty == TOKEN_TYPE_CONTROL
        ]
        user = [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(meta.tokens, meta.token_type)
            if ty == TOKEN_TYPE_USER_DEFINED
        ]
        if control:
            tk.add_special_tokens(control)
        if user:
            tk.add_tokens(user)
    return tk


def _token_id(tk: HFTokenizer, tok) -> int | None:
    if tok is None:
        return None
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tk.token_to_id(tok) if isinstance(tok, str) else None


class Tokenizer:
    """Minimal tokenizer interface used across fedjax_llm.

    ``encode`` never adds special tokens implicitly except a BOS when ``add_bos`` is true
    (per call, defaulting to the tokenizer's own ``add_bos`` setting); special-token strings
    in the text (e.g. ``<|im_start|>``) are matched as single tokens.
    """

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ):
        self.hf = tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_gguf_metadata(cls, meta: GGUFTokenizerMetadata) -> "Tokenizer":
        return cls(
            build_tokenizer_from_gguf(meta),
            bos_id=meta.bos_token_id,
            eos_id=meta.eos_token_id,
            pad_id=meta.pad_token_id,
            add_bos=meta.add_bos_token,
            chat_template=meta.chat_template,
        )

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool | None = None,
    ) -> "Tokenizer":
        """Load a HF ``tokenizer.json`` (or a directory containing one).

        Special ids default to those named in a sibling ``tokenizer_config.json``; ``add_bos``
        defaults to its ``add_bos_token``, else to whether the tokenizer's post-processor
        prepends BOS.
        """
        path = os.fspath(path)
        d = path if os.path.isdir(path) else os.path.dirname(path)
        fn = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(fn):
            raise FileNotFoundError(f"no tokenizer.json at {fn!r}")
        tk = HFTokenizer.from_file(fn)
        cfg = {}
        cfg_fn = os.path.join(d, "tokenizer_config.json")
        if os.path.isfile(cfg_fn):
            with open(cfg_fn) as f:
                cfg = json.load(f)
        bos_id = bos_id if bos_id is not None else _token_id(tk, cfg.get("bos_token"))
        eos_id = eos_id if eos_id is not None else _token_id(tk, cfg.get("eos_token"))
        pad_id = pad_id if pad_id is not None else _token_id(tk, cfg.get("pad_token"))
        if add_bos is None:
            if "add_bos_token" in cfg:
                add_bos = bool(cfg["add_bos_token"])
            else:
                ids = tk.encode("a", add_special_tokens=True).ids
                add_bos = bos_id is not None and len(ids) > 0 and ids[0] == bos_id
        tmpl = cfg.get("chat_template")
        return cls(tk, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, add_bos=add_bos,
                   chat_template=tmpl if isinstance(tmpl, str) else None)

    # ---------------------------------------------------------------- API
    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool | None = None) -> list[list[int]]:
        encs = self.hf.encode_batch(list(texts), add_special_tokens=False)
        use_bos = (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None
        return [([self.bos_id] if use_bos else []) + e.ids for e in encs]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(int(i))

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json``; given a directory, also a ``tokenizer_config.json`` naming
        the special tokens (so ``from_file`` recovers bos/eos/pad ids and ``add_bos``)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            self.hf.save(path)
            return
        self.hf.save(os.path.join(path, "tokenizer.json"))
        cfg = {"add_bos_token": self.add_bos}
        for name, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if i is not None:
                cfg[name] = self.hf.id_to_token(int(i))
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})"
