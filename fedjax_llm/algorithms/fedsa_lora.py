"""FedSA-LoRA: federated share-A LoRA (Guo, Zeng, Wang, Fan, Wang & Qu, 2024, "Selective Aggregation
for Low-Rank Adaptation in Federated Learning", ICLR 2025, arXiv:2410.01463).

The paper finds that A learns general knowledge and B client-specific knowledge, so
only ``a`` (= A^T) is shared; every client keeps its own ``b_k`` (= B_k^T) in the client
store (initialized to the initial ``b``, i.e. zeros):

    client k:  (a_k, b_k) = LocalTrain(a, b_k)           (both factors trained, from the global a
                                                          and the client's own stored b_k)
               upload a_k; store b_k locally
    server:    a' = ServerOpt(a, sum_k p_k a_k)           (FedOpt; FedAvg: a' = sum_k p_k a_k)

Client k's personalized model is (a', b_k) (``personal_params``; train.py evaluates each
eval client on its own held-out rows with it). Communication: ``a`` only, both directions.

Global evaluation (``eval_params``) has no single B in this protocol. We report the model
(a', b_bar) with b_bar = sum_k p_k b_k the p-weighted mean of the last round's cohort
(``ServerState.extra["b_mean"]``; the initial b before the first round). This is a
*diagnostic only*: in the real protocol the server never receives any b_k, so the b_k
travel with the simulated client outputs for this statistic but are not counted in
``sum_bytes_up``.

State layout: ``ServerState.params`` is the shared part (the ``lora_a`` of every module)
with the server optimizer over it; the client store holds ``{"b": b_k}``.
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

from fedjax_llm import tree as T
from fedjax_llm.algorithms import common
from fedjax_llm.algorithms.ffa_lora import check_lora_tree
from fedjax_llm.core.algorithm import FederatedAlgorithm, LossFn, init_server_state, local_training
from fedjax_llm.peft import lora as lora_lib


def fedsa_lora(loss_fn: LossFn, *, client_optimizer: optax.GradientTransformation,
               server_optimizer: optax.GradientTransformation) -> FederatedAlgorithm:
  """Build FedSA-LoRA. ``loss_fn(base, trainable, tokens, mask, key)`` is the per-batch loss."""

  def init(trainable, key):
    del key
    check_lora_tree(trainable, "fedsa_lora")
    a = lora_lib.select_factors(trainable, "lora_a")
    b0 = lora_lib.select_factors(trainable, "lora_b")
    return init_server_state(a, server_optimizer, extra={"b_mean": b0})

  def init_client(trainable, info):
    del info
    return {"b": lora_lib.select_factors(trainable, "lora_b")}

  def client_update(base, server_state, client_state, batches, info, key):
    start = lora_lib.merge_trees(server_state.params, client_state["b"])
    params, m = local_training(loss_fn, base, start, client_optimizer, batches, info.num_steps, key)
    nbytes = common.nbytes(server_state.params)  # a only, each way (b never leaves the client)
    metrics = {"train_loss": m["loss"], "sum_tokens": m["tokens"], **common.comm_metrics(info, up=nbytes, down=nbytes)}
    # The output carries b_k only for the server's diagnostic mean (see module docstring).
    return params, {"b": lora_lib.select_factors(params, "lora_b")}, metrics

  def aggregate(server_state, outputs, weights):
    new_state, metrics = common.fedavg_step(server_state, lora_lib.select_factors(outputs, "lora_a"), weights,
                                            server_optimizer)
    b_mean = T.tree_weighted_mean(lora_lib.select_factors(outputs, "lora_b"), weights)
    b_mean = T.tree_where(jnp.sum(weights) > 0, b_mean, server_state.extra["b_mean"])  # no client: keep it
    return new_state._replace(extra={"b_mean": b_mean}), metrics

  def eval_params(server_state):
    return lora_lib.merge_trees(server_state.params, server_state.extra["b_mean"])

  def personal_params(base, server_state, client_state, tokens, mask):
    del base, tokens, mask
    return lora_lib.merge_trees(server_state.params, client_state["b"])

  return FederatedAlgorithm("fedsa_lora", init, init_client, client_update, aggregate, eval_params,
                            personal_params)
