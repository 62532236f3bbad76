"""RBLA (rank-based aggregation: each rank index averaged over the clients that have it;
heterogeneous ranks 2/4/8) on SmolLM2-135M + Shakespeare-by-role."""
import ml_collections

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "rbla"
  c.lora.rank = 8  # r_max: the global factors' rank
  c.clients.rank_choices = (2, 4, 8)  # client ranks r_k (each <= r_max)
  c.clients.rank_probs = (0.5, 0.3, 0.2)  # fraction of clients at each rank (seeded draw)
  c.rbla = ml_collections.ConfigDict()
  c.rbla.mode = "rbla"  # "rbla" (mean over the covering clients) | "replication" (Byun & Lee: pad from the top-rank clients)
  return c
