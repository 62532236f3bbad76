"""FedKSeed-Pro: FedKSeed with seed sampling by learned importance (softmax of the min-max-normalized mean |g|).

  configs/fedkseed_pro.py          SmolLM2-135M + Shakespeare
  configs/fedkseed_pro.py:smoke    tiny random model (tests)
"""
from configs import fedkseed


def get_config(arg: str | None = None):
  c = fedkseed.get_config(arg)
  c.fedkseed.importance = True  # probability-differentiated seed sampling
  return c
