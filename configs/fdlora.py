"""FDLoRA (dual LoRA: a global module aggregated by the server + a personal module kept by each client,
fused per client with weights from a grid search on a few local samples) on SmolLM2-135M +
Shakespeare-by-role. Evaluation also logs eval/personal_* (each eval client's fused model on its own rows)."""
import ml_collections

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "fdlora"
  c.lora.rank = 16  # r_max = 2 r: columns 0..7 are the global LoRA (r = 8), columns 8..15 the personal one
  c.lora.alpha = 32.0  # s = alpha / r_max = 2, the same per-part scale as a rank-8 LoRA with alpha 16
  c.fdlora = ml_collections.ConfigDict()
  c.fdlora.fusion_global_weights = (0.0, 0.5, 1.0)  # AdaFusion grid for the global module's weight w_g
  c.fdlora.fusion_personal_weights = (0.0, 0.5, 1.0)  # ... and the personal module's weight w_p (cartesian product)
  c.fdlora.fusion_l1 = 0.0  # L1 penalty fusion_l1 * (|w_g| + |w_p|) in the fusion objective (LoraHub uses 0.05)
  c.fdlora.fusion_batches = 1  # local batches of the round that score each grid point (forward passes only)
  return c
