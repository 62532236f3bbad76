"""FedProx (Li et al., 2020, arXiv:1812.06127) on FedIT: SmolLM2-135M + Shakespeare-by-role.

FedProx is not a separate method here: it is the client optimizer's proximal term
``client_optimizer.prox_mu`` (each local step minimizes f_k(w) + mu/2 ||w - w_t||^2,
w_t the model the client started from; fedjax_llm.optim.add_proximal). It composes with
any method through that field; this config applies it to FedIT (algorithm stays "fedit").
"""
from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "fedit"
  c.client_optimizer.prox_mu = 0.01  # FedProx mu: proximal gradient mu (w - w_t) added before clipping and adamw
  return c
