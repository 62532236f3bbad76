"""Load Llama-family GGUF files (llama.cpp format) into HF-named float32 numpy tensors.

``load_gguf(path) -> (LlamaConfig, state_dict, GGUFTokenizerMetadata)``; the state dict uses
Hugging Face names (``model.layers.0.self_attn.q_proj.weight``) and torch ``(out, in)`` layout.
All hyperparameters come from the GGUF metadata. Quantized tensors (Q4_0/Q4_1/Q8_0/K-quants/
F16/BF16...) are dequantized with ``gguf.quants.dequantize``. llama.cpp's converter permutes
the rows of the Q and K projections of ``llama`` models (for its interleaved-pair RoPE);
``unpermute_qk`` undoes it so the standard HF rotate-half RoPE applies.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from fedjax_llm.models.llama import LlamaConfig
from fedjax_llm.models.tokenizer import GGUFTokenizerMetadata

__all__ = ["load_gguf", "read_gguf_config", "unpermute_qk", "permute_qk", "SUPPORTED_GGUF_ARCHITECTURES"]

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")

_LAYER_MAP = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation (``n_head`` = KV heads for K).

    Works for weights ``(n_head * head_dim, d_in)`` and biases ``(n_head * head_dim,)``.
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp ``convert_hf_to_gguf.py`` ``LlamaModel.permute`` (HF -> GGUF row order)."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _require_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError as e:  # pragma: no cover
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install gguf") from e
    return gguf


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _req(reader, key: str, path) -> Any:
    v = _field(reader, key)
    if v is None:
        raise ValueError(f"GGUF file {os.fspath(path)!r} lacks required metadata key {key!r}")
    return v


def _f32(v) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(f"{float(v):.7g}")


def _int(v, key):
    if isinstance(v, (list, tuple)):
        vals = set(int(x) for x in v)
        if len(vals) != 1:
            raise NotImplementedError(f"per-layer varying {key}={v} is not supported")
        return vals.pop()
    return int(v)


def read_gguf_config(reader, path="<gguf>") -> tuple[LlamaConfig, GGUFTokenizerMetadata]:
    """Config and tokenizer metadata from an open ``gguf.GGUFReader``."""
    arch = _req(reader, "general.architecture", path)
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise NotImplementedError(
            f"GGUF architecture {arch!r} in {os.fspath(path)!r} is not supported; supported: {list(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise NotImplementedError("GGUF models with a rope_freqs tensor (Llama-3.1-style RoPE scaling) are not supported")
    a = lambda k, d=None: _field(reader, f"{arch}.{k}", d)
    d_model = int(_req(reader, f"{arch}.embedding_length", path))
    n_head = _int(_req(reader, f"{arch}.attention.head_count", path), "head_count")
    n_kv = _int(a("attention.head_count_kv", n_head), "head_count_kv")
    head_dim = int(a("attention.key_length", d_model // n_head))
    rot = a("rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise NotImplementedError(f"partial rotary embeddings (rope.dimension_count={rot} != head_dim={head_dim}) are not supported")
    rope_scaling = None
    st = a("rope.scaling.type")
    if st not in (None, "none"):
        if st != "linear":
            raise NotImplementedError(f"GGUF rope scaling type {st!r} is not supported; supported: ['linear']")
        rope_scaling = (("factor", _f32(a("rope.scaling.factor"))), ("rope_type", "linear"))

    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = a("vocab_size")
    if vocab is None:
        emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
        vocab = int(emb.shape[-1])
    tok_meta = GGUFTokenizerMetadata(
        model=_field(reader, "tokenizer.ggml.model", "gpt2"),
        pre=_field(reader, "tokenizer.ggml.pre"),
        tokens=list(tokens) if tokens is not None else [],
        merges=list(_field(reader, "tokenizer.ggml.merges", []) or []),
        token_type=[int(x) for x in _field(reader, "tokenizer.ggml.token_type", [])] or None,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        unk_token_id=_field(reader, "tokenizer.ggml.unknown_token_id"),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )
    for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        v = getattr(tok_meta, k)
        if v is not None:
            setattr(tok_meta, k, int(v))
    config = LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=d_model,
        intermediate_size=_int(_req(reader, f"{arch}.feed_forward_length", path), "feed_forward_length"),
        num_layers=int(_req(reader, f"{arch}.block_count", path)),
        num_heads=n_head,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=_f32(a("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(a("rope.freq_base", 10000.0)),
        max_position_embeddings=int(a("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=tok_meta.bos_token_id,
        eos_token_id=tok_meta.eos_token_id,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        attention_out_bias="blk.0.attn_output.bias" in tensor_names,
        mlp_bias="blk.0.ffn_up.bias" in tensor_names,
        rope_scaling=rope_scaling,
        model_type=arch,
    )
    return config, tok_meta


def gguf_to_hf_name(name: str) -> str | None:
    """``blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight`` (None if unknown)."""
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name]
    m = _BLK_RE.match(name)
    if m is None or m.group(2) not in _LAYER_MAP:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"


def load_gguf(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, np.ndarray], GGUFTokenizerMetadata]:
    """Read a GGUF file: ``(config, {hf_name: float32 (out, in) array}, tokenizer metadata)``.

    Each tensor is dequantized once (no extra copies kept); Q/K rows are un-permuted for
    ``llama`` architecture files.
    """
    gguf = _require_gguf()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path!r}")
    reader = gguf.GGUFReader(path)
    config, tok_meta = read_gguf_config(reader, path)
    permuted = config.model_type == "llama"
    state: dict[str, np.ndarray] = {}
    unknown = []
    for t in reader.tensors:
        hf = gguf_to_hf_name(t.name)
        if hf is None:
            unknown.append(t.name)
            continue
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        if t.tensor_type.name in ("F32", "F64", "F16", "BF16", "I8", "I16", "I32", "I64"):
            w = np.array(w, dtype=np.float32)  # may be a view of the file's memmap: copy
        else:
            w = w.astype(np.float32, copy=False)  # freshly dequantized
        expected = tuple(int(s) for s in reversed(t.shape))  # ggml shape is (in, out) -> numpy (out, in)
        if w.shape != expected:
            w = w.reshape(expected)
        if permuted and hf.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_qk(w, config.num_heads)
        elif permuted and hf.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_qk(w, config.num_kv_heads)
        state[hf] = w
    if unknown:
        raise NotImplementedError(f"GGUF file {path!r} has tensors this loader does not map: {unknown[:8]}")
    del reader
    return config, state, tok_meta
