"""Checks every federated algorithm must pass inside the compiled round.

``check_round_conformance(algorithm, base, trainable, num_clients)``:
  * the vmapped round (chunk sizes 4 and 2) equals the per-client Python loop over 2 rounds
    (server state incl. extras, client store, metrics);
  * empty cohort slots (id -1, weight 0) change nothing;
  * the round compiles once across rounds with different cohorts;
  * the round trains something (update_norm > 0) and reports the standard metrics;
  * a round in which no client carries weight leaves the server state (but the round counter) and the
    store unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_llm.core import client_store as store_lib
from fedjax_llm.core import sampling
from fedjax_llm.core.round import build_round, build_sequential_round
from tests.helpers import assert_trees_close, random_cohort

STANDARD = ("train_loss", "sum_tokens", "sum_bytes_up", "sum_bytes_down", "update_norm", "clients")


def _run(algorithm, step_fn, base, trainable, ids, data, num_clients, rounds=2):
  server = algorithm.init(trainable, jax.random.key(0))
  store = store_lib.init_store(algorithm.init_client, trainable, num_clients)
  metrics = None
  for r in range(rounds):
    server, store, metrics = step_fn(base, server, store, jnp.asarray(ids), data, jax.random.key(10 + r))
  return server, store, metrics


def check_round_conformance(algorithm, base, trainable, num_clients: int = 8, rtol=2e-4, atol=2e-6):
  """Runs the checks of the module docstring with two compiled rounds (chunk 4 and chunk 2)."""
  ids = np.array([5, 1, 2, 7], np.int32)
  data = random_cohort(ids, steps=2, batch=2, seq=16)
  sequential = build_sequential_round(algorithm)
  ref = _run(algorithm, sequential, base, trainable, ids, data, num_clients)
  for k in STANDARD:
    assert k in ref[2], f"metric {k!r} missing from {sorted(ref[2])}"
  assert float(ref[2]["update_norm"]) > 0, "the round trained nothing"
  assert float(ref[2]["sum_bytes_up"]) > 0 and float(ref[2]["sum_bytes_down"]) > 0
  step2 = build_round(algorithm, chunk_size=2, donate=False)  # one chunk per vmap, lax.scan over 2 chunks
  for step in (build_round(algorithm, chunk_size=4, donate=False), step2):
    got = _run(algorithm, step, base, trainable, ids, data, num_clients)
    assert_trees_close(got[0], ref[0], rtol=rtol, atol=atol)
    assert_trees_close(got[1], ref[1], rtol=rtol, atol=atol)
    for k in ref[2]:
      np.testing.assert_allclose(got[2][k], ref[2][k], rtol=rtol, atol=1e-5, err_msg=k)

  # empty slots change nothing: 2 clients padded with 2 empty slots == the 2 clients alone
  two = np.array([3, 6], np.int32)
  padded = np.array([3, 6, -1, -1], np.int32)
  d2 = random_cohort(two, seed=3)
  dp = random_cohort(padded, seed=3)
  dp = dp._replace(tokens=dp.tokens.at[:2].set(d2.tokens), mask=dp.mask.at[:2].set(d2.mask),
                   num_tokens=dp.num_tokens.at[:2].set(d2.num_tokens), weights=dp.weights.at[:2].set(d2.weights))
  a = _run(algorithm, sequential, base, trainable, two, d2, num_clients)
  b = _run(algorithm, step2, base, trainable, padded, dp, num_clients)
  assert_trees_close(a[0], b[0], rtol=rtol, atol=atol)
  assert_trees_close(a[1], b[1], rtol=rtol, atol=atol)
  assert float(b[2]["clients"]) == 2.0

  # compiles once across rounds with different cohorts
  server = algorithm.init(trainable, jax.random.key(0))
  store = store_lib.init_store(algorithm.init_client, trainable, num_clients)
  for r in range(2):
    cohort = sampling.sample_cohort(num_clients, 3, seed=0, round_idx=r, padded_size=4)
    server, store, _ = step2(base, server, store, jnp.asarray(cohort), random_cohort(cohort, seed=r),
                             jax.random.key(r))

  # a round in which nobody carries weight changes no server parameter (only the round counter)
  nobody = np.full((4,), -1, np.int32)
  after, store2, _ = step2(base, server, store, jnp.asarray(nobody), random_cohort(nobody, seed=9),
                           jax.random.key(9))
  assert_trees_close(after._replace(round=server.round), server, rtol=0, atol=0)
  assert int(after.round) == int(server.round) + 1
  assert_trees_close(store2, store, rtol=0, atol=0)
  assert step2._cache_size() == 1, "the round recompiled"
  return ref
