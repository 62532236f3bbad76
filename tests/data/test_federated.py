"""Tests for fedjax_llm.data.federated (tokenization, client batches, eval sets)."""

import math
import time

import numpy as np
import pytest

from fedjax_llm.data import federated
from fedjax_llm.data.federated import (
    FederatedTokenData,
    pad_to_multiple,
    select_eval_clients,
    tokenize_client,
)
from fedjax_llm.data.shakespeare import ClientText, load_shakespeare

EOS = 256


def byte_encode(s):
    return list(s.encode("utf-8"))


# --------------------------------------------------------------- tokenization
def test_tokenize_client_exact():
    # stream: a b EOS c d e EOS f  -> 8 tokens
    tokens, mask = tokenize_client("ab\ncde\nf", byte_encode, EOS, 3)
    np.testing.assert_array_equal(
        tokens, np.array([[97, 98, 256], [99, 100, 101], [256, 102, 256]], np.int32)
    )
    np.testing.assert_array_equal(mask, np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0]], np.float32))
    assert tokens.dtype == np.int32 and mask.dtype == np.float32

    tokens, mask = tokenize_client("ab\ncde\nf", byte_encode, EOS, 4)  # exact fit
    np.testing.assert_array_equal(tokens, [[97, 98, 256, 99], [100, 101, 256, 102]])
    np.testing.assert_array_equal(mask, np.ones((2, 4)))

    # 8 tokens, seq_len 7: the last row would hold 1 real token -> no target -> dropped.
    tokens, mask = tokenize_client("ab\ncde\nf", byte_encode, EOS, 7)
    np.testing.assert_array_equal(tokens, [[97, 98, 256, 99, 100, 101, 256]])
    np.testing.assert_array_equal(mask, np.ones((1, 7)))

    # Empty speeches are skipped; padding is eos with mask 0.
    tokens, mask = tokenize_client("\nxy\n\n", byte_encode, EOS, 5)
    np.testing.assert_array_equal(tokens, [[120, 121, 256, 256, 256]])
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0, 0]])

    tokens, mask = tokenize_client("", byte_encode, EOS, 5)
    assert tokens.shape == (0, 5) and mask.shape == (0, 5)
    with pytest.raises(ValueError):
        tokenize_client("ab", byte_encode, EOS, 1)


def test_tokenize_with_hf_tokenizers_model():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[EOS]": 0, "hello": 1, "world": 2, "[UNK]": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    encode = lambda s: tok.encode(s).ids
    tokens, mask = tokenize_client("hello world\nworld foo\nhello", encode, 0, 4)
    np.testing.assert_array_equal(tokens, [[1, 2, 0, 2], [3, 0, 1, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [1, 1, 1, 0]])


# ------------------------------------------------------------------- dataset
def test_from_texts_properties():
    clients = [
        ClientText("p/A", "abcdefgh\nij", "klmno"),  # stream 11 tokens
        ClientText("p/B", "xyz", ""),
    ]
    data = FederatedTokenData.from_texts(clients, byte_encode, EOS, seq_len=4)
    assert data.num_clients == 2 and data.seq_len == 4
    assert data.client_names == ("p/A", "p/B")
    np.testing.assert_array_equal(data.num_train_seqs, [3, 1])  # rows: 4, 4, 3 | 3
    np.testing.assert_array_equal(data.num_train_tokens, [3 + 3 + 2, 2])
    # "klmno" = 5 tokens -> one full row; the 1-token remainder has no target.
    np.testing.assert_array_equal(data.num_heldout_seqs, [1, 0])
    for c in range(2):
        t, m = data.client_arrays(c)
        assert m[:, 1:].sum() == data.num_train_tokens[c]
    tok, mask = data.client_arrays(0, "heldout")
    np.testing.assert_array_equal(tok, [[107, 108, 109, 110]])
    assert data.client_id("p/B") == 1
    s = data.data_summary()
    assert s["clients"] == 2 and s["train_seqs"] == 4 and s["train_tokens"] == 10
    assert s["heldout_seqs"] == 1 and s["heldout_tokens"] == 3
    assert s["train_seqs_per_client"] == dict(min=1, median=2.0, max=3)

    capped = FederatedTokenData.from_texts(clients, byte_encode, EOS, 4, max_train_seqs_per_client=2)
    np.testing.assert_array_equal(capped.num_train_seqs, [2, 1])
    np.testing.assert_array_equal(capped.client_arrays(0)[0], data.client_arrays(0)[0][:2])


def test_from_arrays_matches_from_texts():
    clients = [ClientText(f"p/{i}", "hello world " * (i + 1), "bye now") for i in range(4)]
    a = FederatedTokenData.from_texts(clients, byte_encode, EOS, 8)
    b = FederatedTokenData.from_arrays(
        [c.name for c in clients],
        [tokenize_client(c.train, byte_encode, EOS, 8) for c in clients],
        [tokenize_client(c.heldout, byte_encode, EOS, 8) for c in clients],
    )
    for c in range(4):
        for split in ("train", "heldout"):
            for x, y in zip(a.client_arrays(c, split), b.client_arrays(c, split)):
                np.testing.assert_array_equal(x, y)
    bad = np.ones((1, 8), np.float32)
    bad[0, 3] = 0
    with pytest.raises(ValueError, match="prefix"):
        FederatedTokenData.from_arrays(["x"], [(np.zeros((1, 8), np.int32), bad)])


def test_empty_client_is_an_error():
    clients = [ClientText("p/OK", "plenty of text here", "x"), ClientText("p/EMPTY", "a", "held")]
    with pytest.raises(ValueError, match=r"client 'p/EMPTY' has no training tokens .*seq_len=16"):
        FederatedTokenData.from_texts(clients, byte_encode, EOS, 16)
    with pytest.raises(ValueError, match="client 'q/Z' has no training tokens"):
        FederatedTokenData.from_arrays(
            ["q/Z"], [(np.zeros((0, 4), np.int32), np.zeros((0, 4), np.float32))]
        )


# ------------------------------------------------------------ client batches
def make_indexed_data(counts, seq_len=8, partial_last=True):
    """Synthetic data whose row r (global) has tokens[r, 0] == r + 1000.

    Rows are full except (optionally) each client's last row, which has
    length 2 + (client % (seq_len - 1)).
    """
    counts = np.asarray(counts)
    total = int(counts.sum())
    tokens = np.tile(np.arange(seq_len, dtype=np.int32), (total, 1))
    tokens[:, 0] = np.arange(total) + 1000
    offsets = np.concatenate([[0], np.cumsum(counts)])
    lengths = np.full(total, seq_len, np.int32)
    if partial_last:
        lengths[offsets[1:] - 1] = 2 + np.arange(len(counts)) % (seq_len - 1)
    empty = np.zeros((0, seq_len), np.int32)
    return FederatedTokenData(
        [f"c/{i}" for i in range(len(counts))], seq_len, tokens, lengths, offsets,
        empty, np.zeros(0, np.int32), np.zeros(len(counts) + 1, np.int64),
    )


def local_rows(data, batch, c_pos, client):
    """Client-local row indices drawn by the client at cohort position c_pos."""
    glob = batch["tokens"][c_pos, :, :, 0].reshape(-1) - 1000
    start = int(np.concatenate([[0], np.cumsum(data.num_train_seqs)])[client])
    return glob - start


COUNTS = [1, 3, 5, 16, 17, 40, 100, 7]


def test_client_batches_shapes_dtypes_and_padding():
    data = make_indexed_data(COUNTS)
    ids = np.array([3, -1, 0, 6, -1], np.int32)
    b = data.client_batches(ids, num_steps=2, batch_size=3, seed=1, round_idx=0)
    assert set(b) == {"tokens", "mask", "num_steps", "num_tokens"}
    assert b["tokens"].shape == (5, 2, 3, 8) and b["tokens"].dtype == np.int32
    assert b["mask"].shape == (5, 2, 3, 8) and b["mask"].dtype == np.float32
    assert b["num_steps"].dtype == np.int32 and b["num_tokens"].dtype == np.float32
    np.testing.assert_array_equal(b["num_steps"], [2, 0, 2, 2, 0])
    for pad in (1, 4):
        assert not b["tokens"][pad].any() and not b["mask"][pad].any()
        assert b["num_tokens"][pad] == 0
    np.testing.assert_array_equal(b["num_tokens"], b["mask"][..., 1:].sum(axis=(1, 2, 3)))
    # The mask is the stored row's prefix mask.
    for c_pos, client in ((0, 3), (2, 0), (3, 6)):
        rows = local_rows(data, b, c_pos, client)
        assert ((rows >= 0) & (rows < COUNTS[client])).all()
        lengths = b["mask"][c_pos].reshape(-1, 8).sum(-1)
        expect = np.where(rows == COUNTS[client] - 1, 2 + client % 7, 8)
        np.testing.assert_array_equal(lengths, expect)
    # Deterministic.
    b2 = data.client_batches(ids, num_steps=2, batch_size=3, seed=1, round_idx=0)
    for k in b:
        np.testing.assert_array_equal(b[k], b2[k])
    with pytest.raises(ValueError):
        data.client_batches(np.array([8]), 2, 3, 1, 0)


def test_client_batches_independent_of_cohort():
    data = make_indexed_data(COUNTS)
    S, B, seed, r = 3, 2, 7, 5
    full = data.client_batches(np.arange(8), S, B, seed, r)
    perm = np.array([5, -1, 2, 7, 0, 1, -1, 6, 3, 4])
    shuffled = data.client_batches(perm, S, B, seed, r)
    for pos, client in enumerate(perm):
        if client < 0:
            continue
        alone = data.client_batches(np.array([client]), S, B, seed, r)
        for k in ("tokens", "mask", "num_steps", "num_tokens"):
            np.testing.assert_array_equal(alone[k][0], full[k][client])
            np.testing.assert_array_equal(shuffled[k][pos], full[k][client])
    # Chunked cohort == whole cohort.
    chunks = [data.client_batches(np.arange(i, min(i + 3, 8)), S, B, seed, r) for i in (0, 3, 6)]
    np.testing.assert_array_equal(np.concatenate([c["tokens"] for c in chunks]), full["tokens"])


def test_client_batches_rounds_and_seeds_differ():
    data = make_indexed_data(COUNTS)
    ids = np.arange(8)
    b0 = data.client_batches(ids, 2, 2, seed=0, round_idx=0)
    b1 = data.client_batches(ids, 2, 2, seed=0, round_idx=1)
    c0 = data.client_batches(ids, 2, 2, seed=1, round_idx=0)
    for client in (5, 6):  # 40 and 100 rows: draws must differ
        assert not np.array_equal(b0["tokens"][client], b1["tokens"][client])
        assert not np.array_equal(b0["tokens"][client], c0["tokens"][client])


@pytest.mark.parametrize("S,B", [(4, 4), (2, 3), (1, 1)])
def test_client_batches_epoch_property(S, B):
    """Round r takes positions [r*K, (r+1)*K) of the client's epoch stream."""
    data = make_indexed_data(COUNTS)
    K = S * B
    ids = np.arange(len(COUNTS))
    max_rounds = max(math.ceil(3 * n / K) for n in COUNTS)
    stream = {c: [] for c in ids}
    for r in range(max_rounds):
        b = data.client_batches(ids, S, B, seed=3, round_idx=r)
        for c in ids:
            stream[c].extend(local_rows(data, b, c, c))
    for c, n in enumerate(COUNTS):
        s = np.array(stream[c])
        # Each epoch (n consecutive stream positions from a multiple of n) is a permutation.
        for e in range(3):
            np.testing.assert_array_equal(np.sort(s[e * n:(e + 1) * n]), np.arange(n))
        # Rounds 0..ceil(n/K)-1 together see every row of the client.
        first = s[: math.ceil(n / K) * K]
        assert set(first.tolist()) == set(range(n))
        # Epochs are reshuffled (for clients with enough rows).
        if n >= 16:
            assert not np.array_equal(s[:n], s[n:2 * n])
        if n < K:  # small client: repeats its data within a round
            counts = np.bincount(s[:K], minlength=n)
            assert counts.min() >= K // n and counts.max() <= K // n + 1


def test_permute_is_a_permutation():
    for n in list(range(1, 70)) + [127, 128, 129, 1000, 4097]:
        idx = np.arange(n)
        for key in (0, 12345, 2**63 + 5):
            p = federated._permute(idx, np.full(n, n), np.full(n, key, np.uint64))
            np.testing.assert_array_equal(np.sort(p), idx)
    # Different keys give different permutations.
    n = 50
    a = federated._permute(np.arange(n), np.full(n, n), np.full(n, 1, np.uint64))
    b = federated._permute(np.arange(n), np.full(n, n), np.full(n, 2, np.uint64))
    assert not np.array_equal(a, b)


def test_client_batches_speed_4096_clients():
    rng = np.random.default_rng(0)
    C, S, B, T = 4096, 4, 4, 256
    counts = rng.integers(1, 40, C)
    total = int(counts.sum())
    tokens = rng.integers(0, 50_000, (total, T), dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    lengths = np.full(total, T, np.int32)
    data = FederatedTokenData(
        [str(i) for i in range(C)], T, tokens, lengths, offsets,
        tokens[:0], lengths[:0], np.zeros(C + 1, np.int64),
    )
    ids = rng.permutation(C)
    times = []
    for r in range(3):
        t0 = time.perf_counter()
        b = data.client_batches(ids, S, B, seed=0, round_idx=r)
        times.append(time.perf_counter() - t0)
    print(f"\nclient_batches {C}x{S}x{B}x{T}: {[round(t, 3) for t in times]} s")
    assert b["tokens"].shape == (C, S, B, T)
    # Steady state is ~0.06 s on 2 CPU cores; the first call also pays for
    # page-faulting the fresh 134 MB of output. Generous bound against noise.
    assert min(times) < 1.0


# --------------------------------------------------------------- evaluation
def test_eval_batches_and_padding():
    data = make_indexed_data(COUNTS)
    ids = np.array([6, -1, 0, 2])
    ev = data.eval_batches(ids, max_seqs_per_client=3, split="train")
    np.testing.assert_array_equal(ev["client_index"], [6, 6, 6, 0, 2, 2, 2])
    starts = np.concatenate([[0], np.cumsum(COUNTS)])
    np.testing.assert_array_equal(
        ev["tokens"][:, 0] - 1000,
        [starts[6], starts[6] + 1, starts[6] + 2, starts[0], starts[2], starts[2] + 1, starts[2] + 2],
    )
    assert ev["tokens"].dtype == np.int32 and ev["mask"].dtype == np.float32
    assert ev["mask"].shape == (7, 8)
    np.testing.assert_array_equal(ev["mask"][3].sum(), 2)  # client 0's single, partial row
    all_rows = data.eval_batches(ids, None, split="train")
    assert len(all_rows["tokens"]) == 100 + 1 + 5
    padded = pad_to_multiple(ev, 4)
    assert padded["tokens"].shape == (8, 8) and padded["mask"].shape == (8, 8)
    assert not padded["mask"][7:].any() and not padded["tokens"][7:].any()
    np.testing.assert_array_equal(padded["client_index"][7:], [-1])
    np.testing.assert_array_equal(padded["tokens"][:7], ev["tokens"])
    assert pad_to_multiple(ev, 7)["tokens"].shape == (7, 8)
    # No held-out rows in this synthetic dataset.
    assert data.eval_batches(ids, 3)["tokens"].shape == (0, 8)


def test_select_eval_clients():
    a = select_eval_clients(100, 10, seed=0)
    assert a.shape == (10,) and a.dtype == np.int32
    assert np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 100
    np.testing.assert_array_equal(a, select_eval_clients(100, 10, seed=0))
    assert not np.array_equal(a, select_eval_clients(100, 10, seed=1))
    np.testing.assert_array_equal(select_eval_clients(5, 10, seed=0), np.arange(5))


# ------------------------------------------------------- real corpus, end to end
def test_shakespeare_end_to_end_byte_tokens():
    clients = load_shakespeare(min_chars=1000, heldout_fraction=0.2)
    data = FederatedTokenData.from_texts(clients, byte_encode, EOS, seq_len=128)
    s = data.data_summary()
    print("\n", s)
    assert s["clients"] == len(clients)
    assert (data.num_train_seqs > 0).all() and (data.num_heldout_seqs > 0).all()
    ids = select_eval_clients(data.num_clients, 64, seed=0)
    b = data.client_batches(np.concatenate([ids, [-1, -1]]), 2, 4, seed=0, round_idx=0)
    np.testing.assert_array_equal(b["num_tokens"], b["mask"][..., 1:].sum(axis=(1, 2, 3)))
    ev = pad_to_multiple(data.eval_batches(ids, 2), 16)
    assert len(ev["tokens"]) % 16 == 0
    assert ev["tokens"].max() <= EOS


def test_permute_is_close_to_uniform():
    """Over many keys, where a fixed position lands is ~uniform (chi-square)."""
    m = 20000
    keys = federated._mix64(np.arange(m, dtype=np.uint64))
    for n in (3, 10, 37):
        for pos in (0, n - 1):
            p = federated._permute(np.full(m, pos), np.full(m, n), keys)
            hist = np.bincount(p, minlength=n)
            expected = m / n
            reduced_chi2 = ((hist - expected) ** 2 / expected).sum() / (n - 1)
            assert reduced_chi2 < 2.5, (n, pos, reduced_chi2)
