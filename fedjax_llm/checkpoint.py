"""Orbax checkpoints of the whole federated state, with automatic resume.

A checkpoint at step ``r`` holds the state *after* ``r`` rounds: the server state,
the client store and the host-side RNG-free bookkeeping (everything else in a run
is a pure function of (config, seed, round)), so a restarted run reaches the same
numbers as an uninterrupted one. Saves are synchronous and atomic (Orbax writes a
temporary directory and renames it), and ``train.py`` only saves states that
passed the finiteness check, so a corrupt state never replaces a good checkpoint.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from fedjax_llm.types import PyTree


class Checkpointer:
  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def latest_round(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, round_idx: int, state: PyTree, meta: dict) -> None:
    self._mngr.save(round_idx, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)), force=True)
    self._mngr.wait_until_finished()

  def restore(self, round_idx: int, template: PyTree) -> tuple[PyTree, dict]:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    out = self._mngr.restore(round_idx, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                meta=ocp.args.JsonRestore()))
    return out.state, out.meta

  def close(self) -> None:
    self._mngr.close()
