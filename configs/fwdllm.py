"""FwdLLM: forward-gradient (perturbed-inference) PEFT training, FedSGD-style, no backward pass.

  configs/fwdllm.py          SmolLM2-135M + Shakespeare, LoRA factors
  configs/fwdllm.py:smoke    tiny random model (tests)

Each client estimates the gradient at the global model from n_k directional derivatives (forward-mode jvp),
n_k chosen by its variance rule; the server takes one SGD step with the weighted mean.
"""
import ml_collections

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "fwdllm"
  c.peft.methods = ("lora",)
  c.client_optimizer.name = "sgd"  # only its learning rate is used: the server's SGD step eta
  c.client_optimizer.learning_rate = 0.05 if "smoke" in base.flags(arg) else 0.01  # FwdLLM's demo: 0.01
  c.client_optimizer.grad_clip = 0.0
  c.fwdllm = ml_collections.ConfigDict()
  c.fwdllm.max_perturbations = 8  # n_max directions per client per round
  c.fwdllm.min_perturbations = 2  # n_min (the variance estimate needs 2)
  c.fwdllm.variance_threshold = 0.0  # tau on the per-element variance of the client's mean estimate; 0 = always n_max
  c.fwdllm.estimator = "jvp"  # "jvp" (exact directional derivative, forward mode) | "fd" (central difference, the code's)
  c.fwdllm.eps = 0.01  # h of the "fd" estimator (the code: 0.01)
  c.fwdllm.kind = "gaussian"  # "gaussian" (the paper) | "rademacher"
  c.fwdllm.candidates = 1  # discriminative sampling: keep the best n_max of m * n_max candidates by cosine to G (1 = off)
  c.fwdllm.impl = "auto"  # perturbation kernel: "auto" (Pallas on GPU/TPU, XLA on CPU) | "xla" | "pallas" | "interpret"
  return c
