"""FedIT: federated instruction tuning with LoRA (Zhang et al., 2023, arXiv:2305.05644).

Each client k starts from the global LoRA factors, runs K local optimizer steps on
its data, and uploads (A_k, B_k). The server averages the factors separately,

    A' = sum_k p_k A_k,   B' = sum_k p_k B_k,   p_k proportional to the client's tokens,

(then, optionally, a FedOpt server optimizer on the pseudo-gradient). Note the
aggregation noise sum_k p_k B_k A_k - B' A' = 1/2 sum_{k,j} p_k p_j (B_k - B_j)(A_k - A_j),
zero whenever all A_k or all B_k agree (e.g. one SGD step from B = 0).
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

from fedjax_llm import tree as T
from fedjax_llm.core.algorithm import (FederatedAlgorithm, LossFn, init_server_state, local_training,
                                       server_step)


def fedit(loss_fn: LossFn, *, client_optimizer: optax.GradientTransformation,
          server_optimizer: optax.GradientTransformation) -> FederatedAlgorithm:
  """Build FedIT. ``loss_fn(base, trainable, tokens, mask, key)`` is the per-batch loss."""

  def init(trainable, key):
    del key
    return init_server_state(trainable, server_optimizer)

  def init_client(trainable, info):
    del trainable, info
    return {}

  def client_update(base, server_state, client_state, batches, info, key):
    params, m = local_training(loss_fn, base, server_state.params, client_optimizer, batches,
                               info.num_steps, key)
    nbytes = float(T.tree_bytes(server_state.params))
    present = (info.client_id >= 0).astype(jnp.float32)
    metrics = {"train_loss": m["loss"], "sum_tokens": m["tokens"],
               "sum_bytes_up": nbytes * present, "sum_bytes_down": nbytes * present}
    return params, client_state, metrics

  def aggregate(server_state, outputs, weights):
    aggregated = T.tree_weighted_mean(outputs, weights)
    new_state = server_step(server_state, aggregated, server_optimizer)
    return new_state, {"update_norm": T.tree_norm(T.tree_sub(new_state.params, server_state.params))}

  def eval_params(server_state):
    return server_state.params

  return FederatedAlgorithm("fedit", init, init_client, client_update, aggregate, eval_params)
