"""Tiny-model tests of the NNX Llama: shapes, causality, GQA, numpy parity, bf16, vmap/grad, LoRA hook."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_llm.models import (
    Linear,
    Llama,
    count_params,
    llama_flops_per_token,
    random_llama,
    tiny_llama_config,
)

# ----------------------------------------------------------------------------- numpy reference


def _np(x):
    return np.asarray(x[...], dtype=np.float64)


def np_rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def np_rope(x, pos, theta):
    """x [T, N, hd]; HF rotate-half."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = pos[:, None] * inv[None, :]  # [T, hd/2]
    cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + np.concatenate([-x2, x1], -1) * sin


def np_linear(x, lin):
    y = x @ _np(lin.kernel)
    if lin.bias is not None:
        y = y + _np(lin.bias)
    return y


def np_llama(model: Llama, tokens: np.ndarray) -> np.ndarray:
    """Independent float64 reference forward for one sequence tokens[T] -> logits[T, V]."""
    c = model.config
    T = tokens.shape[0]
    emb = _np(model.model.embed_tokens.embedding)
    h = emb[tokens]
    pos = np.arange(T, dtype=np.float64)
    G = c.num_heads // c.num_kv_heads
    causal = np.tril(np.ones((T, T), bool))
    if c.sliding_window is not None:  # key j visible from query i iff i - W < j <= i
        causal &= np.triu(np.ones((T, T), bool), -(c.sliding_window - 1))
    for layer in model.model.layers:
        a = layer.self_attn
        x = np_rmsnorm(h, _np(layer.input_layernorm.weight), c.rms_norm_eps)
        q = np_linear(x, a.q_proj).reshape(T, c.num_heads, c.head_dim)
        k = np_linear(x, a.k_proj).reshape(T, c.num_kv_heads, c.head_dim)
        v = np_linear(x, a.v_proj).reshape(T, c.num_kv_heads, c.head_dim)
        q, k = np_rope(q, pos, c.rope_theta), np_rope(k, pos, c.rope_theta)
        k = np.repeat(k, G, axis=1)  # HF repeat_kv: head n uses kv head n // G
        v = np.repeat(v, G, axis=1)
        s = np.einsum("tnh,snh->nts", q, k) / np.sqrt(c.head_dim)
        s = np.where(causal[None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
        o = np.einsum("nts,snh->tnh", p, v).reshape(T, c.num_heads * c.head_dim)
        h = h + np_linear(o, a.o_proj)
        x = np_rmsnorm(h, _np(layer.post_attention_layernorm.weight), c.rms_norm_eps)
        m = layer.mlp
        g = np_linear(x, m.gate_proj)
        h = h + np_linear(g / (1 + np.exp(-g)) * np_linear(x, m.up_proj), m.down_proj)
    h = np_rmsnorm(h, _np(model.model.norm.weight), c.rms_norm_eps)
    if model.lm_head is None:
        return h @ emb.T
    return np_linear(h, model.lm_head)


def _perturb_norms(model, seed=0):
    """Give norm weights / biases non-trivial values so the parity test exercises them."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            name = str(path[-1])
            if name == "weight" or name == "bias":
                var.set_value(jnp.asarray(rng.normal(1.0 if name == "weight" else 0.0, 0.1, var.shape), jnp.float32))
    return model


def _tokens(B, T, vocab, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (B, T)), jnp.int32)


# ----------------------------------------------------------------------------- tests


def test_logits_shape_dtype():
    cfg = tiny_llama_config()
    m = random_llama(cfg, 0)
    out = m(_tokens(3, 11, cfg.vocab_size))
    assert out.shape == (3, 11, cfg.vocab_size)
    assert out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()


def test_param_paths_mirror_hf():
    cfg = tiny_llama_config(tie_word_embeddings=False)
    m = random_llama(cfg, 0)
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"model/layers/1/self_attn/{proj}/kernel" in paths
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert f"model/layers/0/mlp/{proj}/kernel" in paths
    for p in ("model/embed_tokens/embedding", "model/layers/0/input_layernorm/weight",
              "model/layers/0/post_attention_layernorm/weight", "model/norm/weight", "lm_head/kernel"):
        assert p in paths
    tied = random_llama(tiny_llama_config(tie_word_embeddings=True), 0)
    assert tied.lm_head is None
    assert not any(str(p[0]) == "lm_head" for p, _ in nnx.to_flat_state(nnx.state(tied)))


def test_causality():
    cfg = tiny_llama_config()
    m = random_llama(cfg, 1)
    toks = np.asarray(_tokens(2, 16, cfg.vocab_size, seed=1))
    base = np.asarray(m(jnp.asarray(toks)))
    t = 9
    toks2 = toks.copy()
    toks2[:, t] = (toks2[:, t] + 5) % cfg.vocab_size
    out2 = np.asarray(m(jnp.asarray(toks2)))
    np.testing.assert_allclose(out2[:, :t], base[:, :t], atol=1e-6, rtol=0)
    assert np.abs(out2[:, t:] - base[:, t:]).max() > 1e-4


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_numpy_parity(tied, kv_heads):
    cfg = tiny_llama_config(tie_word_embeddings=tied, num_kv_heads=kv_heads)
    m = _perturb_norms(random_llama(cfg, 2))
    toks = _tokens(2, 13, cfg.vocab_size, seed=2)
    out = np.asarray(m(toks))
    for b in range(2):
        ref = np_llama(m, np.asarray(toks[b]))
        np.testing.assert_allclose(out[b], ref, atol=1e-5, rtol=1e-5)


def test_numpy_parity_sliding_window():
    cfg = tiny_llama_config(sliding_window=3, model_type="mistral")
    m = _perturb_norms(random_llama(cfg, 14))
    toks = _tokens(1, 10, cfg.vocab_size, seed=14)
    out = np.asarray(m(toks))[0]
    np.testing.assert_allclose(out, np_llama(m, np.asarray(toks[0])), atol=1e-5, rtol=1e-5)
    full = np.asarray(nnx.merge(nnx.split(random_llama(cfg.replace(sliding_window=None), 0))[0], nnx.state(m))(toks))[0]
    np.testing.assert_allclose(full[:3], out[:3], atol=1e-5)  # identical inside the window
    assert np.abs(full[3:] - out[3:]).max() > 1e-4


def test_numpy_parity_with_biases():
    """Qwen2-style q/k/v biases plus o_proj / MLP biases."""
    cfg = tiny_llama_config(attention_bias=True, attention_out_bias=True, mlp_bias=True, tie_word_embeddings=False)
    m = _perturb_norms(random_llama(cfg, 3))
    assert m.model.layers[0].self_attn.q_proj.bias is not None
    toks = _tokens(1, 10, cfg.vocab_size, seed=3)
    np.testing.assert_allclose(np.asarray(m(toks))[0], np_llama(m, np.asarray(toks[0])), atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv():
    """A GQA model equals an MHA model whose K/V heads are the GQA heads repeated (HF repeat_kv)."""
    cfg = tiny_llama_config(num_heads=4, num_kv_heads=2)
    gqa = _perturb_norms(random_llama(cfg, 4))
    mha = random_llama(cfg.replace(num_kv_heads=4), 5)
    src = dict(nnx.iter_graph(gqa))
    for path, var in nnx.iter_graph(mha):
        if isinstance(var, nnx.Param) and not any(str(p) in ("k_proj", "v_proj") for p in path):
            var.set_value(src[path][...])
    hd, G = cfg.head_dim, 2
    for lg, lm in zip(gqa.model.layers, mha.model.layers):
        for name in ("k_proj", "v_proj"):
            k = getattr(lg.self_attn, name).kernel[...]  # [d, kv*hd]
            k = k.reshape(cfg.hidden_size, cfg.num_kv_heads, 1, hd)
            k = jnp.broadcast_to(k, (cfg.hidden_size, cfg.num_kv_heads, G, hd)).reshape(cfg.hidden_size, -1)
            getattr(lm.self_attn, name).kernel.set_value(k)
    toks = _tokens(2, 12, cfg.vocab_size, seed=4)
    np.testing.assert_allclose(np.asarray(gqa(toks)), np.asarray(mha(toks)), atol=1e-5, rtol=1e-5)


def test_bf16_close_to_f32():
    cfg = tiny_llama_config()
    m32 = random_llama(cfg, 6)
    m16 = random_llama(cfg.replace(dtype="bfloat16"), 6)
    assert m16.model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.float32  # params stay f32
    toks = _tokens(2, 12, cfg.vocab_size, seed=6)
    a, b = np.asarray(m32(toks)), np.asarray(m16(toks))
    assert b.dtype == np.float32
    scale = np.abs(a).max()
    assert np.abs(a - b).max() < 0.05 * scale + 1e-3, (np.abs(a - b).max(), scale)


def test_attention_mask_left_padding_matches_unpadded():
    cfg = tiny_llama_config()
    m = random_llama(cfg, 7)
    toks = np.asarray(_tokens(1, 8, cfg.vocab_size, seed=7))
    pad = 3
    padded = np.concatenate([np.zeros((1, pad), np.int32), toks], axis=1)
    mask = np.concatenate([np.zeros((1, pad), bool), np.ones((1, 8), bool)], axis=1)
    ref = np.asarray(m(jnp.asarray(toks)))
    out = np.asarray(m(jnp.asarray(padded), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(out[:, pad:], ref, atol=1e-5, rtol=1e-5)


def test_vmap_over_inputs_params_unbatched():
    cfg = tiny_llama_config()
    m = random_llama(cfg, 8)
    graphdef, state = nnx.split(m)
    toks = _tokens(3 * 2, 10, cfg.vocab_size, seed=8).reshape(3, 2, 10)

    @jax.jit
    def f(state, t):
        return nnx.merge(graphdef, state)(t)

    out = jax.vmap(f, in_axes=(None, 0))(state, toks)
    ref = np.stack([np.asarray(m(toks[i])) for i in range(3)])
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-5)


class _TestLoRA(nnx.Module):
    """Minimal LoRA for tests: y = (x @ A) @ B * scale, with optional recorded dropout keys."""

    log = None

    def __init__(self, d_in, d_out, r, *, rngs, b_init=0.0):
        self.a = nnx.LoRAParam(jax.random.normal(rngs.params(), (d_in, r)) / np.sqrt(d_in))
        self.b = nnx.LoRAParam(jnp.full((r, d_out), b_init, jnp.float32))

    def __call__(self, x, *, dropout_key=None):
        if _TestLoRA.log is not None:
            _TestLoRA.log.append(dropout_key)
        return (x.astype(jnp.float32) @ self.a[...]) @ self.b[...]


def _attach_lora(model, r=2, b_init=0.0, seed=0, targets=("q_proj", "v_proj")):
    rngs = nnx.Rngs(seed)
    for layer in model.model.layers:
        for t in targets:
            lin = getattr(layer.self_attn, t)
            lin.lora = _TestLoRA(lin.in_features, lin.out_features, r, rngs=rngs, b_init=b_init)
    return model


def test_linear_lora_attribute_replacement():
    lin = Linear(4, 3, rngs=nnx.Rngs(0))
    assert lin.lora is None
    x = jnp.ones((2, 4))
    y0 = lin(x)
    lin.lora = _TestLoRA(4, 3, 2, rngs=nnx.Rngs(1), b_init=0.5)
    flat = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(lin))}
    assert {"kernel", "lora/a", "lora/b"} <= flat
    g, lora_state, rest = nnx.split(lin, nnx.LoRAParam, ...)
    assert len(jax.tree_util.tree_leaves(lora_state)) == 2
    lin2 = nnx.merge(g, lora_state, rest)
    np.testing.assert_allclose(np.asarray(lin2(x)), np.asarray(lin(x)), atol=1e-6)
    assert np.abs(np.asarray(lin(x) - y0)).max() > 1e-3
    lin.lora = None  # and back
    np.testing.assert_allclose(np.asarray(lin(x)), np.asarray(y0), atol=1e-6)


@pytest.mark.parametrize("remat", [False, True])
def test_vmap_over_lora_states_with_shared_base(remat):
    """The lead's pattern: vmap over stacked LoRA states, base params unbatched, merge inside."""
    cfg = tiny_llama_config(remat=remat)
    m = _attach_lora(random_llama(cfg, 9), b_init=0.1)
    graphdef, lora_state, base_state = nnx.split(m, nnx.LoRAParam, ...)
    C = 3
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x * (i + 1) for i in range(C)]), lora_state)
    toks = _tokens(2, 9, cfg.vocab_size, seed=9)

    def loss(lora, base, t, key):
        model = nnx.merge(graphdef, lora, base)
        logits = model(t[:, :-1], dropout_key=key)
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, t[:, 1:, None], -1).mean()

    keys = jax.random.split(jax.random.key(0), C)
    val, grads = jax.jit(jax.vmap(jax.value_and_grad(loss), in_axes=(0, None, None, 0)))(stacked, base_state, toks, keys)
    assert val.shape == (C,)
    assert np.isfinite(np.asarray(val)).all()
    loss_jit = jax.jit(loss)
    for i in range(C):
        lora_i = jax.tree_util.tree_map(lambda x: x[i], stacked)
        np.testing.assert_allclose(float(val[i]), float(loss_jit(lora_i, base_state, toks, keys[i])), rtol=1e-5)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(l.shape[0] == C and np.isfinite(np.asarray(l)).all() for l in leaves)
    assert len(set(float(v) for v in np.asarray(val))) == C  # different adapters -> different losses


def test_remat_matches_plain():
    cfg = tiny_llama_config()
    toks = _tokens(2, 10, cfg.vocab_size, seed=10)
    outs, grads = [], []
    for remat in (False, True):
        m = random_llama(cfg.replace(remat=remat), 10)
        g, s = nnx.split(m)
        f = lambda s: nnx.merge(g, s)(toks).astype(jnp.float32).std()
        outs.append(np.asarray(m(toks)))
        grads.append(jax.jit(jax.grad(f))(s))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_jit_grad_params_finite():
    cfg = tiny_llama_config(tie_word_embeddings=False)
    m = random_llama(cfg, 11)
    toks = _tokens(2, 12, cfg.vocab_size, seed=11)
    g, params, rest = nnx.split(m, nnx.Param, ...)

    @jax.jit
    def loss(params):
        logits = nnx.merge(g, params, rest)(toks[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, toks[:, 1:, None], -1).mean()

    val, grads = jax.value_and_grad(loss)(params)
    assert np.isfinite(float(val))
    assert abs(float(val) - np.log(cfg.vocab_size)) < 0.5  # random init ~ uniform
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.isfinite(np.asarray(l)).all() for l in leaves)
    assert all(np.abs(np.asarray(l)).max() > 0 for l in leaves)


def test_grad_wrt_input_embedding_is_causal():
    """d logits[t] / d embedding(token s) is zero for s > t (grad through the embedding gather)."""
    cfg = tiny_llama_config(tie_word_embeddings=False)  # tied: the head would touch every row
    m = random_llama(cfg, 12)
    toks = _tokens(1, 8, cfg.vocab_size, seed=12)
    g, params, rest = nnx.split(m, nnx.Param, ...)

    def out_at(params, t):
        return nnx.merge(g, params, rest)(toks)[0, t].sum()

    grads = jax.jit(jax.grad(out_at), static_argnums=1)(params, 3)
    emb_grad = np.asarray(grads["model"]["embed_tokens"]["embedding"][...])
    used_later = set(np.asarray(toks[0, 4:]).tolist()) - set(np.asarray(toks[0, :4]).tolist())
    assert np.isfinite(emb_grad).all()
    for tok in used_later:
        assert np.abs(emb_grad[tok]).max() == 0.0


def test_dropout_keys_are_distinct_per_projection():
    cfg = tiny_llama_config()
    m = _attach_lora(random_llama(cfg, 13), targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    toks = _tokens(1, 5, cfg.vocab_size)
    try:
        _TestLoRA.log = []
        m(toks)
        assert len(_TestLoRA.log) == 4 * cfg.num_layers and all(k is None for k in _TestLoRA.log)
        _TestLoRA.log = []
        m(toks, dropout_key=jax.random.key(0))
        keys = [tuple(np.asarray(jax.random.key_data(k)).ravel().tolist()) for k in _TestLoRA.log]
    finally:
        _TestLoRA.log = None
    assert len(keys) == 4 * cfg.num_layers
    assert len(set(keys)) == len(keys)


def test_count_params_and_flops():
    cfg = tiny_llama_config(tie_word_embeddings=True)
    m = random_llama(cfg, 0)
    d, f, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    qo = 2 * d * cfg.num_heads * cfg.head_dim
    kv = 2 * d * cfg.num_kv_heads * cfg.head_dim
    per_layer = qo + kv + 3 * d * f + 2 * d
    expected = V * d + L * per_layer + d
    assert count_params(m) == expected == m.param_count
    _attach_lora(m)
    assert m.param_count == expected  # adapters excluded
    assert count_params(m) > expected
    S = 64
    n_matmul = L * (qo + kv + 3 * d * f) + d * V
    assert llama_flops_per_token(cfg, S) == 2 * n_matmul + 4 * L * cfg.num_heads * cfg.head_dim * S
    assert llama_flops_per_token(cfg, S, causal=True) < llama_flops_per_token(cfg, S)
