"""FedIT (FedAvg of LoRA A and B) on SmolLM2-135M + Shakespeare-by-role."""
from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "fedit"
  return c
