"""RoLoRA (alternating rounds: even rounds train and average only B, odd rounds only A) on
SmolLM2-135M + Shakespeare-by-role."""
import ml_collections

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "rolora"
  # No method-specific hyper-parameters: the factor trained in a round is fixed by its parity (round 0: B).
  c.rolora = ml_collections.ConfigDict()
  return c
