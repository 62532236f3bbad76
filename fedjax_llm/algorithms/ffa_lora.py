"""FFA-LoRA: federated freeze-A LoRA (Sun, Li, Li & Ding, 2024, "Improving LoRA in Privacy-preserving
Federated Learning", ICLR 2024, arXiv:2403.12313).

Every client and the server hold the same down-projection ``a`` (= A^T): the LoRA
initialization drawn from the common seed (the initial trainable's ``a``), frozen for
the whole run. Only ``b`` (= B^T, zero-initialized) is trained, uploaded and averaged:

    client k:  b_k = LocalTrain_b(a, b)                 (a fixed; K local optimizer steps)
    server:    b'  = ServerOpt(b, sum_k p_k b_k)         (FedOpt on the pseudo-gradient b - sum_k p_k b_k;
                                                          FedAvg: b' = sum_k p_k b_k)

Because ``a`` is shared, aggregation is exact: with FedAvg,
s a b' = sum_k p_k s a b_k, the weighted mean of the client updates (no FedIT cross term).
Communication: ``b`` only, both directions (a client regenerates ``a`` from the seed).

State layout: ``ServerState.params`` is the trained part (the ``lora_b`` of every module),
the server optimizer state is over ``b`` only, and the frozen ``a`` is kept once in
``ServerState.extra["a"]``; ``eval_params`` merges them back into the full LoRA tree.

Choices: the paper also studies DP-SGD and recommends a larger scale alpha (only B
learns); both are left to the shared config (``client_optimizer``, ``lora.alpha``).
"""
from __future__ import annotations

import optax

from fedjax_llm.algorithms import common
from fedjax_llm.core.algorithm import FederatedAlgorithm, LossFn, init_server_state, local_training
from fedjax_llm.peft import lora as lora_lib


def check_lora_tree(trainable: dict, method: str) -> None:
  """A clear error when the trainable tree holds no LoRA module (the method has nothing to train)."""
  if not list(lora_lib.lora_modules(trainable)):
    keys = sorted(trainable) if isinstance(trainable, dict) else trainable
    raise ValueError(f"{method} needs LoRA modules ({{'lora_a', 'lora_b'}} dicts) in the trainable tree; "
                     f"got a tree with top-level keys {keys!r}")


def ffa_lora(loss_fn: LossFn, *, client_optimizer: optax.GradientTransformation,
             server_optimizer: optax.GradientTransformation) -> FederatedAlgorithm:
  """Build FFA-LoRA. ``loss_fn(base, trainable, tokens, mask, key)`` is the per-batch loss."""

  def init(trainable, key):
    del key
    check_lora_tree(trainable, "ffa_lora")
    b = lora_lib.select_factors(trainable, "lora_b")
    a = lora_lib.select_factors(trainable, "lora_a")  # the shared random init (common seed), frozen
    return init_server_state(b, server_optimizer, extra={"a": a})

  def init_client(trainable, info):
    del trainable, info
    return {}

  def client_update(base, server_state, client_state, batches, info, key):
    a = server_state.extra["a"]
    b, m = local_training(common.frozen_loss(loss_fn, a), base, server_state.params, client_optimizer, batches,
                          info.num_steps, key)
    nbytes = common.nbytes(server_state.params)  # b only, each way
    metrics = {"train_loss": m["loss"], "sum_tokens": m["tokens"], **common.comm_metrics(info, up=nbytes, down=nbytes)}
    return b, client_state, metrics

  def aggregate(server_state, outputs, weights):
    return common.fedavg_step(server_state, outputs, weights, server_optimizer)

  def eval_params(server_state):
    return lora_lib.merge_trees(server_state.extra["a"], server_state.params)

  return FederatedAlgorithm("ffa_lora", init, init_client, client_update, aggregate, eval_params)

