"""FLASC (dense local LoRA training, top-k sparse download and upload) on SmolLM2-135M +
Shakespeare-by-role."""
import ml_collections

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "flasc"
  c.flasc = ml_collections.ConfigDict()
  c.flasc.density_down = 0.25  # fraction of the global LoRA entries sent to clients (top-k of |P|), in (0, 1]
  c.flasc.density_up = 0.25  # fraction of each client's update entries uploaded (top-k of |P_k - P_down|), in (0, 1]
  # "tensor": top-k per factor tensor | "global": one top-k over all LoRA entries (the authors' code). With
  # "global", B (which starts at 0) stays below the cut-off set by A's init for many rounds, so clients
  # never receive it and the downloaded model is the base model; "tensor" sends both factors from round 1.
  c.flasc.scope = "tensor"
  return c
