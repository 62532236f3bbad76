"""HetLoRA (heterogeneous ranks 2/4/8, zero-padding, norm-weighted aggregation, self-pruning)
on SmolLM2-135M + Shakespeare-by-role: the main job of the README."""
import ml_collections

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "hetlora"
  c.lora.rank = 8  # r_max
  c.clients.rank_choices = (2, 4, 8)
  c.clients.rank_probs = (0.5, 0.3, 0.2)
  c.hetlora = ml_collections.ConfigDict()
  c.hetlora.prune_gamma = 0.9  # self-pruning keeps floor(gamma * r_k) ranks when the tail norm shrinks
  c.hetlora.prune_lambda = 1e-3  # weight of the tail-norm regularizer (0 disables self-pruning)
  c.hetlora.min_rank = 1  # never prune below this rank
  return c
