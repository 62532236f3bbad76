"""LoRA-FAIR (server-side correction dB of the averaged B, clients restart from (A_bar, B_bar + dB))
on SmolLM2-135M + Shakespeare-by-role."""
import ml_collections

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "lora_fair"
  c.lora_fair = ml_collections.ConfigDict()
  c.lora_fair.objective = "cosine"  # "cosine": the paper's 1 - cos(dW, (B+dB)A) + lam ||dB||_F; "lstsq": closed-form ridge
  c.lora_fair.lam = 0.01  # regularization weight lambda on the correction dB (paper: 0.01; 0 = no regularizer)
  c.lora_fair.steps = 50  # server proximal-gradient steps on dB per round ("cosine" only)
  c.lora_fair.step_size = 0.5  # scale-free step (times ||A_bar B_bar||^2 / ||A_bar^T A_bar||_F); halved on a rejected step
  return c
