"""FedMeZO: FedAvg with MeZO local steps (SPSA, forward passes only) on any trainable tree.

  configs/fedmezo.py          SmolLM2-135M + Shakespeare, LoRA factors tuned by zeroth order
  configs/fedmezo.py:smoke    tiny random model (tests)

``c.peft.methods = ("full",)`` tunes every weight instead (then upload="seeds" keeps the upload to
kilobytes: the server replays each client's (key, scalars)).
"""
import ml_collections

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "fedmezo"
  c.peft.methods = ("lora",)
  c.client_optimizer.name = "sgd"  # only its learning rate is used: the ZO-SGD step eta
  c.client_optimizer.learning_rate = 1e-3 if "smoke" in base.flags(arg) else 1e-4
  c.client_optimizer.grad_clip = 0.0
  if "smoke" not in base.flags(arg):
    c.fl.local_steps = 16  # ZO steps per client per round
  c.fedmezo = ml_collections.ConfigDict()
  c.fedmezo.eps = 1e-3  # SPSA perturbation scale (MeZO: 1e-3)
  c.fedmezo.num_perturbations = 1  # n directions per step, their estimates averaged (MeZO: 1)
  c.fedmezo.kind = "gaussian"  # "gaussian" (MeZO) | "rademacher"
  c.fedmezo.upload = "weights"  # "weights" (the paper: FedAvg of trained trees) | "seeds" (key + scalars, replayed)
  c.fedmezo.impl = "auto"  # perturbation kernel: "auto" (Pallas on GPU/TPU, XLA on CPU) | "xla" | "pallas" | "interpret"
  return c
