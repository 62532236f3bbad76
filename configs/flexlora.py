"""FlexLoRA (full-size aggregation of the clients' products, SVD redistribution at each client's
rank; heterogeneous ranks 2/4/8) on SmolLM2-135M + Shakespeare-by-role."""
import ml_collections

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "flexlora"
  c.lora.rank = 8  # r_max: the global factors' rank; the modules' scale is alpha / r_max
  c.clients.rank_choices = (2, 4, 8)  # client ranks r_k (each <= r_max)
  c.clients.rank_probs = (0.5, 0.3, 0.2)  # fraction of clients at each rank (seeded draw)
  c.flexlora = ml_collections.ConfigDict()
  c.flexlora.scale = "uniform"  # client LoRA scale s_k: "uniform" (alpha / r_max) | "rank" (alpha / r_k)
  return c
