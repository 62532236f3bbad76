"""RoLoRA: alternating optimization of LoRA factors (Chen et al., 2024, "Robust Federated Finetuning
of Foundation Models via Alternating Minimization of LoRA", arXiv:2409.02346; extended as "Robust
Federated Finetuning of LLMs via Alternating Optimization of LoRA", arXiv:2502.01755).

Clients train one factor while the other is frozen, and the server aggregates only the
trained one. With t = ``server_state.round`` (0, 1, 2, ...):

    t even (train b):  b_k = LocalTrain_b(a, b)  (a frozen);   b' = ServerOpt_b(b, sum_k p_k b_k),  a' = a
    t odd  (train a):  a_k = LocalTrain_a(a, b)  (b frozen);   a' = ServerOpt_a(a, sum_k p_k a_k),  b' = b

Because the frozen factor is the same for every client, aggregation is exact:
sum_k p_k s a_k b_k = s a' b' with FedAvg (e.g. t even: s a (sum_k p_k b_k)). Starting with
b (t = 0) matters: from b = 0 the gradient of a is zero, so an "a first" round would be wasted.

Alternation granularity: per communication round. Each iteration of the paper's
Algorithm 1 is a B-phase (local updates of B with A fixed, upload and average B) followed
by an A-phase (local updates of A with the new B fixed, upload and average A): two
communication rounds, each carrying one factor (hence "half the communication"). We
run exactly that sequence with one simulator round per phase (even rounds: B-phase, odd
rounds: A-phase), as methods.md says ("alternate rounds"). The one difference: the
simulator samples a fresh cohort for each phase, where an iteration of the paper uses the
same clients in both phases (identical under full participation). (Only the abstracts
were retrievable when this was written, so this reading of Algorithm 1 is unverified
against the full text; the same even/odd per-round alternation is what LoRA-A2,
arXiv:2410.22815, uses. Re-check if it matters.)

Freezing: local training gets a ``project`` that replaces the frozen factor by its start
value before every forward pass, so it gets zero gradient and neither the optimizer nor
AdamW weight decay can move it; the client returns it exactly unchanged (bit-identical).
The server keeps one optimizer state per factor (``opt_state = {"lora_a": .., "lora_b": ..}``),
each stepped only on its factor's rounds, so adaptive server optimizers (FedAdam, ...)
see each factor's own pseudo-gradient sequence.

Communication: upload = the trained factor only. Download = both factors: the simulator's
clients are stateless between participations (cohorts are sampled afresh), so a client
needs the current frozen factor (updated in the previous round) as well as the start
of the trained one. (With full participation and clients that keep the adapter between
rounds, only the factor aggregated in the previous round would have to be sent.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_llm import tree as T
from fedjax_llm.algorithms import common
from fedjax_llm.algorithms.ffa_lora import check_lora_tree
from fedjax_llm.core.algorithm import FederatedAlgorithm, LossFn, ServerState, local_training, server_step
from fedjax_llm.peft import lora as lora_lib

FACTORS = ("lora_a", "lora_b")


def trains_b(round_idx) -> jax.Array:
  """True on the rounds that train ``b`` (even rounds, starting with round 0)."""
  return jnp.asarray(round_idx) % 2 == 0


def freeze_factor(params: dict, start: dict, train_b) -> dict:
  """``params`` with the frozen factor replaced by its value in ``start`` (exactly; ``train_b`` may be traced).

  ``train_b``: the ``lora_a`` leaves come from ``start`` and ``lora_b`` from ``params``; otherwise the reverse.
  Leaves that are not LoRA factors are taken from ``params``.
  """
  def pick(path, x, s):
    name = getattr(path[-1], "key", None)
    if name == "lora_a":
      return jnp.where(train_b, s, x)
    if name == "lora_b":
      return jnp.where(train_b, x, s)
    return x
  return jax.tree_util.tree_map_with_path(pick, params, start)


def rolora(loss_fn: LossFn, *, client_optimizer: optax.GradientTransformation,
           server_optimizer: optax.GradientTransformation) -> FederatedAlgorithm:
  """Build RoLoRA. ``loss_fn(base, trainable, tokens, mask, key)`` is the per-batch loss."""

  def init(trainable, key):
    del key
    check_lora_tree(trainable, "rolora")
    opt_state = {f: server_optimizer.init(lora_lib.select_factors(trainable, f)) for f in FACTORS}
    return ServerState(params=trainable, opt_state=opt_state, round=jnp.zeros((), jnp.int32), extra=None)

  def init_client(trainable, info):
    del trainable, info
    return {}

  def client_update(base, server_state, client_state, batches, info, key):
    train_b = trains_b(server_state.round)
    start = server_state.params
    project = lambda p: freeze_factor(p, start, train_b)
    params, m = local_training(loss_fn, base, start, client_optimizer, batches, info.num_steps, key, project)
    bytes_a = common.nbytes(lora_lib.select_factors(start, "lora_a"))
    bytes_b = common.nbytes(lora_lib.select_factors(start, "lora_b"))
    up = jnp.where(train_b, bytes_b, bytes_a)
    metrics = {"train_loss": m["loss"], "sum_tokens": m["tokens"], "trained_b": train_b.astype(jnp.float32),
               **common.comm_metrics(info, up=up, down=bytes_a + bytes_b)}
    return params, client_state, metrics

  def step_factor(factor: str, outputs, weights):
    other = "lora_a" if factor == "lora_b" else "lora_b"

    def step(state: ServerState) -> ServerState:
      part = ServerState(lora_lib.select_factors(state.params, factor), state.opt_state[factor], state.round)
      aggregated = T.tree_weighted_mean(lora_lib.select_factors(outputs, factor), weights)
      new = server_step(part, aggregated, server_optimizer)
      params = lora_lib.merge_trees(new.params, lora_lib.select_factors(state.params, other))
      return ServerState(params, {**state.opt_state, factor: new.opt_state}, new.round, state.extra)
    return step

  def aggregate(server_state, outputs, weights):
    new_state = jax.lax.cond(trains_b(server_state.round), step_factor("lora_b", outputs, weights),
                             step_factor("lora_a", outputs, weights), server_state)
    return new_state, {"update_norm": T.tree_norm(T.tree_sub(new_state.params, server_state.params))}

  def eval_params(server_state):
    return server_state.params

  return FederatedAlgorithm("rolora", init, init_client, client_update, aggregate, eval_params)
