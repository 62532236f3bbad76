"""FedDPA (a global adapter aggregated by the server + a local adapter kept by each client, mixed per test
instance by the cosine similarity of its representation to the client's training instances) on
SmolLM2-135M + Shakespeare-by-role. Evaluation also logs eval/personal_* (instance-weighted models)."""
import ml_collections

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.algorithm = "feddpa"
  c.lora.rank = 16  # r_max = 2 r: columns 0..7 are the global adapter (r = 8), columns 8..15 the local one
  c.lora.alpha = 32.0  # s = alpha / r_max = 2, the same per-part scale as a rank-8 LoRA with alpha 16
  c.feddpa = ml_collections.ConfigDict()
  c.feddpa.variant = "T"  # "T": FedDPA-T (local adapter trained each round next to the frozen global one);
  #                         "F": FedDPA-F (local adapter fine-tuned from the received global adapter)
  c.feddpa.update_weight = 0.5  # FedDPA-T: global adapter's weight alpha while the local one trains (1 - alpha)
  c.feddpa.max_local_weight = 0.5  # w_max: local weight = w_max * mean cosine similarity (public code's "half")
  c.feddpa.num_reference = 5  # training sequences per client whose representations are kept (as their mean)
  c.feddpa.pooling = "last"  # instance representation: "last" token's final hidden state, or "mean" over tokens
  c.feddpa.representation = "frozen"  # hidden states of the frozen LLM, or "local" (LLM + local adapter)
  c.feddpa.local_start_round = 1  # first round (0-based) in which local adapters train (public code: 1)
  return c
