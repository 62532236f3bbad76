"""FedIT with the FedAdam server optimizer (Reddi et al., 2021, "Adaptive Federated Optimization",
arXiv:2003.00295) on SmolLM2-135M + Shakespeare-by-role.

The server runs Adam on the pseudo-gradient x - mean_k y_k (fedjax_llm.train.make_server_optimizer:
fedjax_llm.optim.fedopt_adaptive("adam"), the paper's Algorithm 2 exactly: no bias correction,
m_{-1} = 0, v_{-1} = tau^2; server_optimizer.name="adam" is optax.adam instead). Its step is
about learning_rate per coordinate regardless of the update's size, so the server learning rate
is much smaller than FedAvg's 1.0.
"""
from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "fedit"
  c.server_optimizer.name = "fedadam"
  c.server_optimizer.learning_rate = 1e-2  # server eta: per-coordinate step size of Adam on the pseudo-gradient
  c.server_optimizer.b1 = 0.9  # first-moment decay (Reddi et al. use 0.9)
  c.server_optimizer.b2 = 0.99  # second-moment decay (Reddi et al. use 0.99)
  c.server_optimizer.eps = 1e-3  # adaptivity tau (Reddi et al. tune it on a log grid; 1e-3 is their common choice)
  return c
