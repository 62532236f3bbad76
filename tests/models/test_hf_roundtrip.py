"""Checkpoint I/O round trips: HF safetensors dirs, GGUF files (written here), Q/K permutation, errors."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_llm.models import (
    Tokenizer,
    load_gguf,
    load_hf_dir,
    load_pretrained,
    load_state_dict_into,
    model_state_dict,
    permute_qk,
    random_llama,
    save_hf_dir,
    tiny_llama_config,
    unpermute_qk,
)


def _tokens(B, T, vocab, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (B, T)), jnp.int32)


def _randomize_all(model, seed):
    """Non-trivial values for every param (norms and biases too)."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            var.set_value(jnp.asarray(rng.normal(0, 0.2, var.shape) + (1.0 if var.ndim == 1 else 0.0), jnp.float32))
    return model


def _tiny_tokenizer(vocab_size=97):
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

    tk = HFTok(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer)
    return Tokenizer(tk, bos_id=1, eos_id=2)


CONFIGS = {
    "tied": dict(tie_word_embeddings=True),
    "untied": dict(tie_word_embeddings=False),
    "qwen2_bias": dict(tie_word_embeddings=False, attention_bias=True, attention_out_bias=False, model_type="qwen2"),
    "llama_bias": dict(attention_bias=True, attention_out_bias=True, mlp_bias=True),
    "llama3_rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral_window": dict(model_type="mistral", sliding_window=4),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_dir_roundtrip_identical_logits(tmp_path, name):
    cfg = tiny_llama_config(**CONFIGS[name])
    model = _randomize_all(random_llama(cfg, 0), 1)
    tok = _tiny_tokenizer(cfg.vocab_size)
    save_hf_dir(model, cfg, tmp_path, tokenizer=tok)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_cfg["num_hidden_layers"] == cfg.num_layers and hf_cfg["num_key_value_heads"] == cfg.num_kv_heads
    loaded, tok2 = load_pretrained(str(tmp_path))
    assert loaded.config == cfg
    toks = _tokens(2, 12, cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(loaded(toks)), np.asarray(model(toks)))
    text = "the quick brown fox, hello world"
    assert tok2.encode(text) == tok.encode(text) and tok2.decode(tok2.encode(text)) == text
    assert (tok2.bos_id, tok2.eos_id, tok2.pad_id) == (1, 2, 2)


def test_state_dict_layout(tmp_path):
    cfg = tiny_llama_config(tie_word_embeddings=False)
    model = random_llama(cfg, 0)
    sd = model_state_dict(model)
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (cfg.num_heads * cfg.head_dim, cfg.hidden_size)  # torch (out, in)
    np.testing.assert_array_equal(q.T, np.asarray(model.model.layers[0].self_attn.q_proj.kernel[...]))
    assert sd["model.layers.1.self_attn.k_proj.weight"].shape == (cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size)
    assert sd["lm_head.weight"].shape == (cfg.vocab_size, cfg.hidden_size)
    assert sd["model.embed_tokens.weight"].shape == (cfg.vocab_size, cfg.hidden_size)
    # save a state dict (not a model), then read it back raw
    save_hf_dir(sd, cfg, tmp_path)
    cfg2, sd2 = load_hf_dir(tmp_path)
    assert cfg2 == cfg and sorted(sd2) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(sd2[k], sd[k])


def test_bf16_checkpoint_loads_as_float32(tmp_path):
    cfg = tiny_llama_config()
    model = random_llama(cfg, 3)
    save_hf_dir(model, cfg, tmp_path, dtype="bfloat16")
    cfg2, sd = load_hf_dir(tmp_path)
    assert all(v.dtype == np.float32 for v in sd.values())
    loaded, _ = load_pretrained(tmp_path)
    assert loaded.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.float32
    toks = _tokens(1, 10, cfg.vocab_size)
    a, b = np.asarray(model(toks)), np.asarray(loaded(toks))
    assert np.abs(a - b).max() < 0.02 * np.abs(a).max() + 1e-3


def test_bf16_raw_reader_fallback(tmp_path):
    """The dependency-free safetensors reader decodes bf16 exactly like safetensors+ml_dtypes."""
    from fedjax_llm.models.hf import _read_safetensors_raw, read_safetensors

    cfg = tiny_llama_config()
    save_hf_dir(random_llama(cfg, 4), cfg, tmp_path, dtype="bfloat16")
    fn = str(tmp_path / "model.safetensors")
    a, b = read_safetensors(fn), dict(_read_safetensors_raw(fn))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_qk_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    for n_head, head_dim, d_in in [(9, 64, 576), (3, 64, 576), (4, 8, 32), (2, 6, 5)]:
        w = rng.normal(size=(n_head * head_dim, d_in)).astype(np.float32)
        # llama.cpp convert_hf_to_gguf.py LlamaModel.permute, written out independently
        fwd = w.reshape(n_head, 2, head_dim // 2, d_in).swapaxes(1, 2).reshape(w.shape)
        assert not np.array_equal(fwd, w)
        np.testing.assert_array_equal(unpermute_qk(fwd, n_head), w)
        np.testing.assert_array_equal(permute_qk(w, n_head), fwd)
        b = rng.normal(size=(n_head * head_dim,))
        np.testing.assert_array_equal(unpermute_qk(permute_qk(b, n_head), n_head), b)


def test_qk_permutation_matches_interleaved_rope():
    """Why the permutation exists: llama.cpp's interleaved-pair RoPE on permuted rows equals HF
    rotate-half RoPE on the original rows (so un-permuting + rotate-half is correct)."""
    rng = np.random.default_rng(1)
    hd, n_head, T = 8, 2, 5
    q = rng.normal(size=(T, n_head * hd))
    pos = np.arange(T)[:, None]
    inv = 1.0 / 10000 ** (np.arange(0, hd, 2) / hd)
    ang = pos * inv  # [T, hd/2]
    # HF rotate-half on original layout
    x = q.reshape(T, n_head, hd)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    hf = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    # llama.cpp: permute rows (= output features), then rotate adjacent pairs
    qp = permute_qk(q.T, n_head).T.reshape(T, n_head, hd // 2, 2)
    a, b = qp[..., 0], qp[..., 1]
    gg = np.stack([a * c - b * s, b * c + a * s], -1).reshape(T, n_head * hd)
    back = unpermute_qk(gg.T, n_head).T.reshape(T, n_head, hd)
    np.testing.assert_allclose(back, hf, atol=1e-12)


def _write_tiny_gguf(path, model, cfg, tok_vocab, merges):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tok_vocab)
    w.add_token_types([3 if t.startswith("<") and len(t) > 1 else 1 for t in tok_vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {
        "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
        "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
        "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
        "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down",
    }
    for k, v in model_state_dict(model).items():
        if k == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif k == "model.norm.weight":
            g = "output_norm.weight"
        elif k == "lm_head.weight":
            g = "output.weight"
        else:
            i, rest = k[len("model.layers."):].split(".", 1)
            g = f"blk.{i}.{names[rest]}.weight"
            if rest.startswith("self_attn.q_proj"):
                v = permute_qk(v, cfg.num_heads)
            elif rest.startswith("self_attn.k_proj"):
                v = permute_qk(v, cfg.num_kv_heads)
        w.add_tensor(g, np.ascontiguousarray(v, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_roundtrip_identical_logits(tmp_path, tied):
    """Write a tiny F32 llama GGUF the way llama.cpp does (permuted Q/K), load it back."""
    cfg = tiny_llama_config(tie_word_embeddings=tied, rope_theta=100000.0)
    model = _randomize_all(random_llama(cfg, 5), 6)
    tok = _tiny_tokenizer(cfg.vocab_size)
    vocab = sorted(tok.hf.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    tokens = [t for t, _ in vocab] + [f"<pad{i}>" for i in range(cfg.vocab_size - len(vocab))]
    merges = [" ".join(m) for m in json.loads(tok.hf.to_str())["model"]["merges"]]
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, model, cfg, tokens, merges)

    cfg2, sd, meta = load_gguf(path)
    assert cfg2.replace(model_type="llama") == cfg
    assert meta.pre == "smollm" and meta.bos_token_id == 1 and meta.eos_token_id == 2
    loaded, tok2 = load_pretrained(str(path))
    toks = _tokens(2, 12, cfg.vocab_size, seed=7)
    np.testing.assert_allclose(np.asarray(loaded(toks)), np.asarray(model(toks)), atol=1e-6, rtol=1e-6)
    text = "the lazy dog, hello world"
    assert tok2.decode(tok2.encode(text)) == text
    assert tok2.encode(text) == tok.encode(text)
    assert tok2.encode("<s>hello") == [1] + tok.encode("hello")


def test_strict_loading_errors():
    cfg = tiny_llama_config(tie_word_embeddings=False)
    model = random_llama(cfg, 0)
    sd = model_state_dict(model)
    bad = dict(sd)
    del bad["model.layers.1.mlp.up_proj.weight"]
    bad["model.layers.9.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(KeyError) as e:
        load_state_dict_into(random_llama(cfg, 1), bad)
    assert "model.layers.1.mlp.up_proj.weight" in str(e.value) and "model.layers.9.mlp.up_proj.weight" in str(e.value)
    wrong = dict(sd)
    wrong["model.norm.weight"] = np.ones((cfg.hidden_size + 1,), np.float32)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_state_dict_into(random_llama(cfg, 1), wrong)
    # tied models ignore a stray lm_head.weight
    tied_cfg = cfg.replace(tie_word_embeddings=True)
    m = load_state_dict_into(random_llama(tied_cfg, 2), sd)
    np.testing.assert_array_equal(np.asarray(m.model.embed_tokens.embedding[...]), sd["model.embed_tokens.weight"])


def test_unknown_name_and_unsupported_architecture(tmp_path):
    with pytest.raises(ValueError, match="smollm2-135m"):
        load_pretrained("no-such-model")
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(NotImplementedError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_pretrained(str(d))
    e = tmp_path / "empty"
    e.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_dir(e)
    cfg = tiny_llama_config()
    (e / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                "vocab_size": 97, "hidden_size": 32, "intermediate_size": 64,
                                                "num_hidden_layers": 2, "num_attention_heads": 4}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf_dir(e)
    assert cfg.vocab_size == 97
