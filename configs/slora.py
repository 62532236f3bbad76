"""SLoRA (sparse fine-tuning stage, then LoRA initialized from the SVD of the sparse update, then FedIT)
on SmolLM2-135M + Shakespeare-by-role."""
import ml_collections

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "slora"
  c.slora = ml_collections.ConfigDict()
  c.slora.sparse_rounds = 5  # rounds of stage 1 (sparse fine-tuning of the targeted kernels); LoRA from round 6 on
  c.slora.density = 0.01  # fraction of each targeted kernel's entries trained in stage 1 (one mask from c.seed)
  # Frozen kernel after the switch: "pretrained" (the paper: reset to W0, stage 2 is LoRA on W0 initialized
  # from the rank-r SVD of the sparse update) or "residual" (keep W0 + dW_s - s a b; an ablation).
  c.slora.frozen_weight = "pretrained"
  if arg == "smoke":
    c.slora.sparse_rounds = 2  # of the smoke run's 4 rounds: both stages run
    c.slora.density = 0.05  # the tiny model's kernels are small
  return c
