"""Small pieces every federated LoRA method shares: presence, byte accounting, FedAvg + server step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from fedjax_llm import tree as T
from fedjax_llm.core.algorithm import ServerState, server_step
from fedjax_llm.peft import lora as lora_lib


def present(info) -> jax.Array:
  """1.0 for a real client, 0.0 for an empty cohort slot (client id -1)."""
  return (info.client_id >= 0).astype(jnp.float32)


def comm_metrics(info, *, up: float | jax.Array, down: float | jax.Array) -> dict:
  """``sum_bytes_up`` / ``sum_bytes_down`` of one client (0 for an empty slot), given bytes."""
  p = present(info)
  return {"sum_bytes_up": jnp.asarray(up, jnp.float32) * p, "sum_bytes_down": jnp.asarray(down, jnp.float32) * p}


def nbytes(tree) -> float:
  """Bytes of a pytree as sent (its dtype), a static Python float."""
  return float(T.tree_bytes(tree))


def rank_bytes(tree: dict, rank, factors=("lora_a", "lora_b"), bytes_per_param: float = 4.0) -> jax.Array:
  """Bytes of the listed factors of every LoRA module truncated to ``rank`` (traced ok)."""
  total = jnp.zeros((), jnp.float32)
  for _, m in lora_lib.lora_modules(tree):
    d_in, d_out = m["lora_a"].shape[0], m["lora_b"].shape[1]
    per_rank = (d_in if "lora_a" in factors else 0) + (d_out if "lora_b" in factors else 0)
    total = total + jnp.asarray(rank, jnp.float32) * per_rank
  return bytes_per_param * total


def fedavg_step(server_state: ServerState, outputs, weights, server_optimizer: optax.GradientTransformation):
  """FedAvg of the outputs (weights p_k) then the FedOpt server step; returns (state, metrics)."""
  aggregated = T.tree_weighted_mean(outputs, weights)
  new_state = server_step(server_state, aggregated, server_optimizer)
  return new_state, {"update_norm": T.tree_norm(T.tree_sub(new_state.params, server_state.params))}


def frozen_loss(loss_fn, frozen: dict):
  """``loss(base, trained, ...)`` of the model whose other parameters are fixed to ``frozen``."""
  def loss(base, trained, tokens, mask, key):
    return loss_fn(base, lora_lib.merge_trees(trained, frozen), tokens, mask, key)
  return loss


def split_mutable_base(trainable: dict, name: str) -> tuple[dict, dict]:
  """(LoRA factors, targeted kernels) of a mutable-base trainable tree; a clear error if kernels are missing."""
  lora, kernels = lora_lib.split_kernels(trainable)
  n_mod = len(list(lora_lib.lora_modules(lora)))
  n_ker = len(jax.tree.leaves(kernels))
  if n_mod == 0 or n_ker != n_mod:
    raise ValueError(f"{name} needs the kernel of every LoRA-targeted layer in the trainable tree ({name} changes "
                     f"the frozen kernels: {name}.mutable_base is True; tests: tiny_lora_model(mutable_base=True)); "
                     f"got {n_mod} LoRA modules and {n_ker} kernels")
  return lora, kernels
