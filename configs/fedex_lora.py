"""FedEx-LoRA (exact aggregation: FedAvg of A and B, the residual folded into the targeted kernels)
on SmolLM2-135M + Shakespeare-by-role."""
import ml_collections

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "fedex_lora"
  c.fedex_lora = ml_collections.ConfigDict()
  # How the kernel update each client downloads is counted: "factored" (the paper's protocol: the
  # residuals folded since the client's last download as rank-(K-1)r factors, or dense when smaller)
  # or "dense" (d_in x d_out float32 per targeted layer whenever a residual is pending).
  c.fedex_lora.residual_download = "factored"
  return c
