"""HetLoRA (heterogeneous ranks 2/4/8, zero-padding, norm-weighted aggregation, self-pruning)
on SmolLM2-135M + Shakespeare-by-role: the main job of the README."""
from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "hetlora"
  c.lora.rank = 8  # r_max
  c.hetlora.rank_choices = (2, 4, 8)
  c.hetlora.rank_probs = (0.5, 0.3, 0.2)
  return c
