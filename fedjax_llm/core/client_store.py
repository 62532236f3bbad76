"""Per-client persistent state: one pytree with a leading axis of size ``num_clients``.

The round gathers ``store[cohort_ids]`` and scatters the updated states back.
Cohort slots with id ``-1`` (padding) read client 0's state (their result is
discarded) and write nothing.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_llm.types import Array, ClientInfo, PyTree


def init_store(init_client, trainable: PyTree, num_clients: int) -> PyTree:
  """vmap ``init_client`` over all clients (ids 0..num_clients-1)."""
  info = ClientInfo(client_id=jnp.arange(num_clients, dtype=jnp.int32),
                    num_steps=jnp.zeros((num_clients,), jnp.int32),
                    num_tokens=jnp.zeros((num_clients,), jnp.float32))
  return jax.vmap(init_client, in_axes=(None, 0))(trainable, info)


def gather(store: PyTree, ids: Array) -> PyTree:
  safe = jnp.maximum(ids, 0)
  return jax.tree.map(lambda x: x[safe], store)


def scatter(store: PyTree, ids: Array, values: PyTree) -> PyTree:
  def f(x, v):
    n = x.shape[0]
    idx = jnp.where(ids >= 0, ids, n)  # out of bounds: dropped
    return x.at[idx].set(v.astype(x.dtype), mode="drop")
  return jax.tree.map(f, store, values)
