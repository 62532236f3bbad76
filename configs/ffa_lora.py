"""FFA-LoRA (A frozen at the shared random init, only B trained and sent) on SmolLM2-135M +
Shakespeare-by-role."""
import ml_collections

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "ffa_lora"
  # No method-specific hyper-parameters: A is the LoRA init from c.seed, B starts at 0. The paper
  # recommends a larger scale alpha than plain LoRA since only B learns (c.lora.alpha).
  c.ffa_lora = ml_collections.ConfigDict()
  return c
