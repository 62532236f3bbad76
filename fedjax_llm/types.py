"""Type aliases and the small state types shared by the round and the algorithms.

Shapes are written inline: ``C`` is the cohort axis, ``S`` local steps, ``B`` the
local batch, ``T`` the sequence length. Nothing below ``core/round.py`` sees ``C``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax

PyTree = Any
Array = jax.Array
PRNGKey = jax.Array
Trainable = PyTree  # the trainable pytree (e.g. LoRA factors), plain arrays
Base = PyTree  # the frozen base model's params, stored once, never mapped over clients
ServerState = PyTree
ClientState = PyTree
ClientOutput = PyTree
Metrics = dict


class ClientInfo(NamedTuple):
  """What the round tells one client about itself (scalars; a leading C axis in the round)."""

  client_id: Array  # int32 []: global client index (-1 for an empty cohort slot)
  num_steps: Array  # int32 []: local steps this client runs this round (<= S); 0 for an empty slot
  num_tokens: Array  # float32 []: target tokens in this round's local data; 0 for an empty slot


class ClientBatches(NamedTuple):
  """One client's local data for a round (static shapes; padding is masked)."""

  tokens: Array  # int32 [S, B, T]
  mask: Array  # float32 [S, B, T]: 1 for real tokens


class EvalBatch(NamedTuple):
  tokens: Array  # int32 [N, T]
  mask: Array  # float32 [N, T]
