"""The registry of federated algorithms: one line per method.

``get_algorithm(name)`` fails loudly on an unknown name, listing the known ones.
Each builder takes the per-batch loss and keyword hyper-parameters and returns a
``FederatedAlgorithm``; modules are imported on first use.
"""
from __future__ import annotations

import importlib

from fedjax_llm.algorithms.fedit import fedit
from fedjax_llm.algorithms.hetlora import hetlora

# name -> "module:builder" under fedjax_llm.algorithms
REGISTRY = {
    # LoRA, homogeneous rank
    "fedit": "fedit:fedit",
    "ffa_lora": "ffa_lora:ffa_lora",
    "fedsa_lora": "fedsa_lora:fedsa_lora",
    "rolora": "rolora:rolora",
    "flasc": "flasc:flasc",
    "fedex_lora": "fedex_lora:fedex_lora",
    "lora_fair": "lora_fair:lora_fair",
    "federa": "federa:federa",
    "slora": "slora:slora",
    "scaffold": "scaffold:scaffold",
    # LoRA, heterogeneous rank
    "hetlora": "hetlora:hetlora",
    "flora": "flora:flora",
    "flexlora": "flexlora:flexlora",
    "rbla": "rbla:rbla",
    # LoRA, personalized
    "fdlora": "fdlora:fdlora",
    "feddpa": "feddpa:feddpa",
    # any PEFT tree (prompt, prefix, adapter, BitFit, partial, LoRA, a head, or a union)
    "fedavg": "fedit:fedit",  # FedAvg of every trainable leaf (FedPrompt / FedAdapter / FedBitFit / FedIT)
    "fedper": "fedper:fedper",  # shared + client-local parts (personalized prompts / adapters / heads)
    "selective": "selective:selective",  # partial tuning with per-client depth
    "fedbpt": "fedbpt:fedbpt",  # black-box prompt tuning with CMA-ES (forward passes only)
    # zeroth order (forward passes only; seed-replayed perturbations)
    "fedmezo": "fedmezo:fedmezo",  # FedAvg of MeZO local training, any trainable tree
    "fedkseed": "fedkseed:fedkseed",  # K shared seeds, (index, scalar) uploads, replay from W0
    "fedkseed_pro": "fedkseed:fedkseed_pro",  # FedKSeed with importance-sampled seeds
    "fwdllm": "fwdllm:fwdllm",  # forward-gradient PEFT training with variance-controlled perturbations
}


def get_algorithm(name: str):
  try:
    spec = REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown algorithm {name!r}; known algorithms: {', '.join(sorted(REGISTRY))}") from None
  module, _, attr = spec.partition(":")
  return getattr(importlib.import_module(f"fedjax_llm.algorithms.{module}"), attr)
