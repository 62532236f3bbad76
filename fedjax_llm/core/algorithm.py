"""``FederatedAlgorithm``: a federated method as a NamedTuple of pure functions.

Everything is written for ONE client; ``core/round.py`` is the only place that
vmaps, chunks and (later) shards the client axis. The frozen base parameters are
an explicit argument (``base``), passed once and never mapped over clients.

  init(trainable, key)                         -> server_state
  init_client(trainable, info)                 -> client_state            (no C axis)
  client_update(base, server_state, client_state, batches, info, key)
                                               -> (output, client_state, metrics)   (no C axis)
  aggregate(server_state, outputs, weights)    -> (server_state, metrics)           (outputs: leading C axis)
  eval_params(server_state)                    -> trainable used for global evaluation
  personal_params(base, server_state, client_state, tokens[T], mask[T])   (optional; personalized methods)
                                               -> trainable a client uses on one of its own sequences
  broadcast(base, server_state)                -> the server state as every client of the round sees it
                                                  (optional; default: the server state itself)

``weights`` are float32 [C], unnormalized: the cohort's aggregation weights p_k
(by default the client's number of training tokens, FedAvg's n_k; 0 for empty
cohort slots); an algorithm may re-weight. Client metrics are float32 scalars;
keys starting with ``sum_`` are summed over the cohort, all others are averaged
weighted by the client's target tokens this round.

Methods that change the frozen weights (FedEx-LoRA, FLoRA, FeDeRA, SLoRA) declare it on their
builder (``builder.mutable_base = True``): the trainable tree they are given then also
holds the ``kernel`` of every LoRA-targeted layer, which they keep in ``ServerState.extra``
(one copy, updated by the server step) and hand back through ``eval_params``; the rest of
the base stays in ``base``. ``personal_params`` is evaluated row by row, so a method may
weight its parts per instance (FedDPA); ``None`` means the global model is everyone's.
``broadcast`` is computed once per round, before any client runs, and what it returns is handed to every
``client_update`` in place of the server state (``aggregate`` still gets the server state): it is where a
method puts a computation every client would repeat identically, e.g. FedKSeed's rebuild of the global
model from W0 and the accumulated per-seed scalars.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_llm import tree as T
from fedjax_llm.types import Array, ClientBatches


class FederatedAlgorithm(NamedTuple):
  name: str
  init: Callable
  init_client: Callable
  client_update: Callable
  aggregate: Callable
  eval_params: Callable
  personal_params: Callable | None = None
  broadcast: Callable | None = None


class ServerState(NamedTuple):
  """Global trainable params, the server optimizer's state, the round counter and method extras."""

  params: dict  # the global trainable pytree (e.g. LoRA factors at r_max)
  opt_state: optax.OptState
  round: Array  # int32 []
  extra: Any = None  # method-specific server data (merged kernels, control variates, ...); a pytree


def init_server_state(trainable: dict, server_optimizer: optax.GradientTransformation,
                      extra: Any = None) -> ServerState:
  return ServerState(params=trainable, opt_state=server_optimizer.init(trainable),
                     round=jnp.zeros((), jnp.int32), extra=extra)


def server_step(state: ServerState, aggregated: dict,
                server_optimizer: optax.GradientTransformation) -> ServerState:
  """Apply the server optimizer to the pseudo-gradient ``params - aggregated`` (FedOpt).

  With ``optax.sgd(1.0)`` this is plain FedAvg: the new params equal ``aggregated``.
  """
  pseudo_grad = T.tree_sub(state.params, aggregated)
  updates, opt_state = server_optimizer.update(pseudo_grad, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return ServerState(params=params, opt_state=opt_state, round=state.round + 1, extra=state.extra)


LossFn = Callable  # loss(base, trainable, tokens[B,T], mask[B,T], key) -> (loss, aux{'nll_sum','tokens'})


def local_training(loss_fn: LossFn, base, params: dict, optimizer: optax.GradientTransformation,
                   batches: ClientBatches, num_steps: Array, key: Array,
                   project: Callable[[dict], dict] | None = None) -> tuple[dict, dict]:
  """Run ``S`` local optimizer steps with ``lax.scan``; steps ``>= num_steps`` are no-ops.

  Args:
    loss_fn: ``loss(base, params, tokens, mask, key) -> (scalar, aux)`` (aux has
      ``nll_sum`` and ``tokens``); regularizers are added by the caller's loss.
    project: applied to the params before every forward pass (e.g. a rank mask),
      so parameters outside the projection get zero gradient.
  Returns:
    (final params, metrics) with ``loss`` = token-weighted mean training NLL over
    the active steps, ``tokens`` = target tokens trained on.
  """
  project = project or (lambda p: p)
  opt_state = optimizer.init(params)
  num_steps_total = batches.tokens.shape[0]

  def step(carry, xs):
    params, opt_state = carry
    i, tokens, mask = xs
    grad_fn = jax.value_and_grad(lambda p: loss_fn(base, project(p), tokens, mask, jax.random.fold_in(key, i)),
                                 has_aux=True)
    (_, aux), grads = grad_fn(params)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    active = i < num_steps
    params = T.tree_where(active, new_params, params)
    opt_state = T.tree_where(active, new_opt_state, opt_state)
    af = active.astype(jnp.float32)
    return (params, opt_state), (aux["nll_sum"] * af, aux["tokens"] * af)

  (params, _), (nll, toks) = jax.lax.scan(
      step, (params, opt_state), (jnp.arange(num_steps_total), batches.tokens, batches.mask))
  total = jnp.sum(toks)
  metrics = {"loss": jnp.sum(nll) / jnp.maximum(total, 1.0), "tokens": total}
  return project(params), metrics
