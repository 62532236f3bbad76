"""SCAFFOLD (control variates on the LoRA factors, option II) on SmolLM2-135M + Shakespeare-by-role.

The client optimizer is plain SGD without clipping: SCAFFOLD's corrected step
y <- y - eta_l (g - c_i + c) and its control update c_i+ = c_i - c + (x - y) / (K eta_l)
are defined for SGD (under Adam, momentum or clipping the control update is no longer a
mean gradient; see fedjax_llm/algorithms/scaffold.py).
"""
import ml_collections

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "scaffold"
  c.client_optimizer.name = "sgd"  # SCAFFOLD's correction is defined for SGD
  # eta_l (also divides the control update). SGD needs a far larger step than adamw; 0.1 is untuned for
  # SmolLM2 (no clipping: lower it if the NaN guard trips); the smoke model learns visibly at 0.5.
  c.client_optimizer.learning_rate = 0.5 if arg == "smoke" else 0.1
  c.client_optimizer.momentum = 0.0  # plain SGD: (x - y) / (K eta_l) is then the mean corrected gradient
  c.client_optimizer.grad_clip = 0.0  # no clipping: a clipped step breaks the option-II control estimate
  c.scaffold = ml_collections.ConfigDict()
  c.scaffold.control_lr = 1.0  # server control step: c += control_lr * |S|/N * mean dc (1 = the paper)
  c.scaffold.use_control = True  # False removes the control variates (the method is then FedIT)
  return c
