"""FLoRA (stacking-based aggregation merged into the base weights; heterogeneous ranks 2/4/8)
on SmolLM2-135M + Shakespeare-by-role."""
import ml_collections

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "flora"
  c.lora.rank = 8  # r_max: the widest client rank; the modules' scale is alpha / r_max
  c.clients.rank_choices = (2, 4, 8)  # client ranks r_k (each <= r_max)
  c.clients.rank_probs = (0.5, 0.3, 0.2)  # fraction of clients at each rank (seeded draw)
  c.flora = ml_collections.ConfigDict()
  c.flora.scale = "uniform"  # client LoRA scale s_k: "uniform" (alpha / r_max, the public code) | "rank" (alpha / r_k)
  return c
