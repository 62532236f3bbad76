"""FeDeRA (LoRA initialized from the truncated SVD of the pretrained weights, then FedIT)
on SmolLM2-135M + Shakespeare-by-role."""
import ml_collections

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "federa"
  c.federa = ml_collections.ConfigDict()
  # Frozen kernel after the SVD init: "residual" (the paper: W0 - s a b, so the initial model is the
  # pretrained one) or "pretrained" (keep W0; an ablation). The LoRA scale s = lora.alpha / lora.rank.
  c.federa.frozen_weight = "residual"
  # The SVD init makes factor entries ~sqrt(sigma / s) |U| ~ 0.27 on SmolLM2's q/v (sigma_1 ~ 82), ~7x the
  # standard init's 0.04; Adam's step is per entry, so the same lr would move W ~7x faster: scale it down.
  c.client_optimizer.learning_rate = 3e-4
  return c
