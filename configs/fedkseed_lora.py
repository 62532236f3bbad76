"""FedKSeed on the LoRA factors instead of every weight (same seeds-and-scalars protocol, 1.8M directions' worth
of coordinates instead of 135M: cheaper perturbations and a larger stable step).

  configs/fedkseed_lora.py          SmolLM2-135M + Shakespeare
  configs/fedkseed_lora.py:smoke    tiny random model (tests)
"""
from configs import base, fedkseed


def get_config(arg: str | None = None):
  c = fedkseed.get_config(arg)
  c.peft.methods = ("lora",)  # LoRA factors (lora.* as in the FedIT config), B = 0 at init
  c.client_optimizer.learning_rate = 1e-3 if "smoke" in base.flags(arg) else 5e-4  # 5x MeZO's LoRA lr: B = 0 at init makes the first steps tiny
  c.fedkseed.eps = 1e-2  # MeZO's LoRA eps
  return c
