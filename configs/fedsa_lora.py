"""FedSA-LoRA (A shared and averaged, each client's B kept local) on SmolLM2-135M + Shakespeare-by-role.
Logs eval/personal_loss (each eval client with its own B) next to the diagnostic global eval."""
import ml_collections

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "fedsa_lora"
  # No method-specific hyper-parameters: every client's B starts at the initial B (zeros) in the client store.
  c.fedsa_lora = ml_collections.ConfigDict()
  return c
