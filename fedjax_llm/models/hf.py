"""Hugging Face checkpoint I/O: ``config.json`` + ``*.safetensors`` <-> ``LlamaConfig`` + HF-named arrays,
and the mapping between HF tensor names and the NNX parameter paths of ``Llama``.

Name mapping (NNX path -> HF name)::

    model/layers/3/self_attn/q_proj/kernel  <->  model.layers.3.self_attn.q_proj.weight  (transposed)
    model/layers/3/self_attn/q_proj/bias    <->  model.layers.3.self_attn.q_proj.bias
    model/embed_tokens/embedding            <->  model.embed_tokens.weight
    model/norm/weight                       <->  model.norm.weight
    lm_head/kernel                          <->  lm_head.weight                       (transposed)
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedjax_llm.models.llama import LlamaConfig, base_param_items
from fedjax_llm.models.tokenizer import Tokenizer

__all__ = [
    "SUPPORTED_HF_ARCHITECTURES",
    "config_from_hf",
    "config_to_hf",
    "load_hf_dir",
    "load_hf_tokenizer",
    "save_hf_dir",
    "hf_name_for_path",
    "base_param_items",
    "load_state_dict_into",
    "model_state_dict",
    "read_safetensors",
]

# HF architecture class -> model_type
SUPPORTED_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_ARCH_FOR_TYPE = {v: k for k, v in SUPPORTED_HF_ARCHITECTURES.items()}

# keys some checkpoints carry that are not parameters
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------- config


def _first_id(v):
    if isinstance(v, (list, tuple)):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def config_from_hf(cfg: Mapping[str, Any], *, source: str = "config.json") -> LlamaConfig:
    """``LlamaConfig`` from a HF ``config.json`` dict (Llama / Mistral / Qwen2 keys)."""
    archs = list(cfg.get("architectures") or [])
    model_type = cfg.get("model_type")
    if model_type is None and archs:
        model_type = SUPPORTED_HF_ARCHITECTURES.get(archs[0])
    supported = sorted(SUPPORTED_HF_ARCHITECTURES)
    if model_type not in _ARCH_FOR_TYPE or (archs and not any(a in SUPPORTED_HF_ARCHITECTURES for a in archs)):
        raise NotImplementedError(
            f"unsupported architecture in {source}: architectures={archs}, model_type={model_type!r}; supported: {supported}"
        )
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise NotImplementedError(f"hidden_act={act!r} in {source} is not supported (only 'silu')")
    n_head = int(cfg["num_attention_heads"])
    d = int(cfg["hidden_size"])
    head_dim = cfg.get("head_dim") or d // n_head
    rope_params = cfg.get("rope_parameters") or {}
    rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    rope_scaling = cfg.get("rope_scaling")
    if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if isinstance(rope_scaling, dict) and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
        rope_scaling = None
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
        sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    else:
        qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        sliding = cfg.get("sliding_window") if model_type == "mistral" else None
    max_pos = int(cfg.get("max_position_embeddings", 2048))
    if sliding is not None and int(sliding) >= max_pos:
        sliding = None
    return LlamaConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=d,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=n_head,
        num_kv_heads=int(cfg.get("num_key_value_heads") or n_head),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=_first_id(cfg.get("bos_token_id")),
        eos_token_id=_first_id(cfg.get("eos_token_id")),
        attention_bias=qkv_bias,
        attention_out_bias=o_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        rope_scaling=rope_scaling,
        sliding_window=None if sliding is None else int(sliding),
        model_type=model_type,
    )


def config_to_hf(config: LlamaConfig, *, torch_dtype: str = "float32") -> dict:
    """A HF ``config.json`` dict for ``config`` (``LlamaForCausalLM`` unless Qwen2/Mistral)."""
    c = config
    model_type = c.model_type if c.model_type in _ARCH_FOR_TYPE else "llama"
    if model_type == "llama" and c.attention_bias != c.attention_out_bias:
        if c.attention_bias and not c.attention_out_bias:
            model_type = "qwen2"  # q/k/v bias without o bias is the Qwen2 layout
        else:
            raise ValueError("o_proj bias without q/k/v bias has no Hugging Face equivalent")
    if model_type == "qwen2" and not (c.attention_bias and not c.attention_out_bias):
        raise ValueError("a Qwen2 config needs attention_bias=True and attention_out_bias=False")
    out = {
        "architectures": [_ARCH_FOR_TYPE[model_type]],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": None if c.rope_scaling is None else dict(c.rope_scaling),
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "mlp_bias": c.mlp_bias,
        "torch_dtype": torch_dtype,
    }
    if model_type != "qwen2":
        out["attention_bias"] = c.attention_bias
    if model_type == "mistral" or (model_type == "qwen2" and c.sliding_window is not None):
        out["sliding_window"] = c.sliding_window
        if model_type == "qwen2":
            out["use_sliding_window"] = True
    return out


# ----------------------------------------------------------------------------- safetensors


def _to_f32(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.float32:
        return a
    if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
        return a.astype(np.float32)
    return a


_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def _read_safetensors_raw(fn: str) -> Iterator[tuple[str, np.ndarray]]:
    """Minimal safetensors reader (fallback when the installed ``safetensors`` cannot give
    numpy bf16): header = u64 length + JSON, then raw little-endian data."""
    with open(fn, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    mm = np.memmap(fn, dtype=np.uint8, mode="r", offset=8 + n)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = mm[start:end]
        shape = tuple(info["shape"])
        if info["dtype"] == "BF16":
            a = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
        elif info["dtype"] in _ST_DTYPES:
            a = np.array(raw.view(_ST_DTYPES[info["dtype"]]).reshape(shape))
        else:
            raise NotImplementedError(f"safetensors dtype {info['dtype']} of {name!r} in {fn!r} is not supported")
        yield name, _to_f32(a)


def read_safetensors(fn: str) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as numpy; floating tensors (incl. bf16) -> float32."""
    out: dict[str, np.ndarray] = {}
    try:
        from safetensors import safe_open

        with safe_open(fn, framework="np") as f:
            for k in f.keys():
                out[k] = _to_f32(f.get_tensor(k))
        return out
    except (TypeError, ValueError, ImportError) as e:  # e.g. bf16 unsupported by this safetensors/numpy
        if "bf16" not in str(e).lower() and "bfloat16" not in str(e).lower() and not isinstance(e, ImportError):
            raise
    return dict(_read_safetensors_raw(fn))


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(path, fn) for fn in sorted(set(weight_map.values()))]
    return sorted(glob.glob(os.path.join(path, "*.safetensors")))


def load_hf_dir(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Read a HF model directory: ``(config, {hf_name: float32 array in torch (out, in) layout})``.

    The tokenizer (``tokenizer.json``) is read separately by ``load_hf_tokenizer``.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"not a Hugging Face model directory: {path!r} (expected config.json + *.safetensors)")
    cfg_fn = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_fn):
        raise FileNotFoundError(f"no config.json in {path!r} (expected a Hugging Face model directory: config.json + *.safetensors)")
    with open(cfg_fn) as f:
        config = config_from_hf(json.load(f), source=cfg_fn)
    files = _safetensors_files(path)
    if not files:
        present = sorted(os.listdir(path))
        raise FileNotFoundError(f"no *.safetensors weights in {path!r} (found {present}); only safetensors checkpoints are supported")
    state: dict[str, np.ndarray] = {}
    for fn in files:
        state.update(read_safetensors(fn))
    for k in [k for k in state if k.endswith(_IGNORED_SUFFIXES)]:
        del state[k]
    return config, state


def load_hf_tokenizer(path: str | os.PathLike, config: LlamaConfig | None = None) -> Tokenizer | None:
    """``Tokenizer`` from ``<path>/tokenizer.json`` (None if absent); special ids default to ``config``'s."""
    path = os.fspath(path)
    fn = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(fn):
        return None
    tok = Tokenizer.from_file(path)
    if config is not None:
        if tok.bos_id is None:
            tok.bos_id = config.bos_token_id
        if tok.eos_id is None:
            tok.eos_id = config.eos_token_id
        if tok.pad_id is None:
            tok.pad_id = tok.eos_id
    return tok


# ----------------------------------------------------------------------------- NNX <-> HF names


def hf_name_for_path(path: tuple) -> tuple[str, bool]:
    """NNX param path -> (HF tensor name, transpose?)."""
    *prefix, leaf = (str(p) for p in path)
    if leaf == "kernel":
        return ".".join(prefix + ["weight"]), True
    if leaf in ("embedding", "weight"):
        return ".".join(prefix + ["weight"]), False
    if leaf == "bias":
        return ".".join(prefix + ["bias"]), False
    raise KeyError(f"no Hugging Face name for parameter path {'/'.join(map(str, path))!r}")


def load_state_dict_into(
    model: nnx.Module, state_dict: dict[str, np.ndarray], *, strict: bool = True, consume: bool = False
) -> nnx.Module:
    """Copy HF-named ``(out, in)`` tensors into ``model``'s params in place (kernels are transposed).

    Works on an abstract model from ``nnx.eval_shape`` too. ``strict`` raises on missing or
    unexpected keys (listing them) and shape mismatches always raise. ``lm_head.weight`` is
    ignored for tied-embedding models. ``consume=True`` pops tensors from ``state_dict`` as they
    are used (keeps peak memory at about one copy of the weights). Returns ``model``.
    """
    items = base_param_items(model)
    names = {hf_name_for_path(p)[0] for p, _ in items}
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    ignorable = {"lm_head.weight"} if tied else set()
    missing = sorted(n for n in names if n not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in names and k not in ignorable and not k.endswith(_IGNORED_SUFFIXES))
    if strict and (missing or unexpected):
        raise KeyError(f"state dict does not match the model: missing={missing[:20]} unexpected={unexpected[:20]}"
                       + (f" (+{len(missing) + len(unexpected) - 40} more)" if len(missing) + len(unexpected) > 40 else ""))
    for path, var in items:
        name, transpose = hf_name_for_path(path)
        if name not in state_dict:
            continue
        arr = state_dict.pop(name) if consume else state_dict[name]
        arr = np.asarray(arr)
        if transpose:
            arr = arr.T
        cur = var.get_value()
        if tuple(arr.shape) != tuple(cur.shape):
            raise ValueError(f"shape mismatch for {name!r} -> {'/'.join(map(str, path))}: "
                             f"checkpoint {tuple(arr.shape)} vs model {tuple(cur.shape)}")
        var.set_value(jnp.asarray(arr, dtype=cur.dtype))
        del arr
    if consume:
        for k in list(state_dict):
            if k in ignorable or k.endswith(_IGNORED_SUFFIXES):
                del state_dict[k]
    return model


def model_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Base params as HF-named numpy arrays in torch ``(out, in)`` layout (float32)."""
    out = {}
    for path, var in base_param_items(model):
        name, transpose = hf_name_for_path(path)
        a = np.asarray(jax.device_get(var.get_value()), dtype=np.float32)
        out[name] = np.ascontiguousarray(a.T if transpose else a)
    return out


def save_hf_dir(
    model_or_state_dict: nnx.Module | Mapping[str, np.ndarray],
    config: LlamaConfig,
    path: str | os.PathLike,
    *,
    tokenizer: Tokenizer | None = None,
    dtype: str = "float32",
) -> str:
    """Write ``config.json`` + ``model.safetensors`` (HF layout) and optionally the tokenizer.

    ``dtype``: "float32" or "bfloat16" for the saved tensors. Tied models omit ``lm_head.weight``.
    Returns the directory path.
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if isinstance(model_or_state_dict, nnx.Module):
        sd = model_state_dict(model_or_state_dict)
    else:
        sd = {k: np.asarray(v, dtype=np.float32) for k, v in model_or_state_dict.items()}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if dtype in ("bfloat16", "bf16"):
        import ml_dtypes

        sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
        torch_dtype = "bfloat16"
    elif dtype in ("float32", "f32"):
        torch_dtype = "float32"
    else:
        raise ValueError(f"save dtype {dtype!r} not supported; use 'float32' or 'bfloat16'")
    sd = {k: np.ascontiguousarray(v) for k, v in sd.items()}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(config, torch_dtype=torch_dtype), f, indent=2)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(path)
    return path
