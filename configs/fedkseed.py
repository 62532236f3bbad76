"""FedKSeed: federated FULL-parameter zeroth-order tuning with K shared seeds (forward passes only).

  configs/fedkseed.py          SmolLM2-135M + Shakespeare, every weight tuned, kilobytes per client per round
  configs/fedkseed.py:smoke    tiny random model (tests)

Every local step samples one of K seeds, estimates the scalar directional derivative by two forward passes
(SPSA) and uploads (seed index, scalar); the global model is W0 + sum_j a_j z_j, rebuilt by replaying the
K accumulated scalars from W0 every round. ``client_optimizer`` is unused except for its learning rate
(plain ZO-SGD; Adam would break the replay).
"""
import ml_collections

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "fedkseed"
  c.peft.methods = ("full",)  # every parameter of the model (embeddings included)
  c.client_optimizer.name = "sgd"  # only its learning rate is used: the ZO-SGD step eta
  c.client_optimizer.learning_rate = 2e-5 if "smoke" in base.flags(arg) else 1e-6  # eta (paper: 3e-7, OPT/LLaMA 1-3B)
  c.client_optimizer.grad_clip = 0.0
  if "smoke" not in base.flags(arg):
    c.fl.local_steps = 16  # ZO steps per client per round (the paper: 200 steps of batch size 1)
    c.fl.batch_size = 2
    c.fl.num_rounds = 20
    c.fl.chunk_size = 4  # clients vmapped together; memory ~ chunk x 2 copies of the full model
  c.fedkseed = ml_collections.ConfigDict()
  c.fedkseed.num_seeds = 1024  # K candidate seeds (the paper: 4096; its README: 1024)
  c.fedkseed.eps = 1e-3  # SPSA perturbation scale (the paper's code: 5e-4)
  c.fedkseed.kind = "rademacher"  # "rademacher" (+-1, 32 directions per Threefry call) | "gaussian" (the paper)
  c.fedkseed.importance = False  # True: FedKSeed-Pro (seed probabilities from the |g| history)
  c.fedkseed.clip = 1000.0  # |g| clip of the importance history (the code's bias_loss_clip)
  c.fedkseed.impl = "auto"  # perturbation kernel: "auto" (Pallas on GPU/TPU, XLA on CPU) | "xla" | "pallas" | "interpret"
  return c
