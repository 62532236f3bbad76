"""The registry of federated algorithms: one line per method.

``get_algorithm(name)`` fails loudly on an unknown name, listing the known ones.
Each builder takes the per-batch loss and keyword hyper-parameters and returns a
``FederatedAlgorithm``.
"""
from __future__ import annotations

from fedjax_llm.algorithms.fedit import fedit
from fedjax_llm.algorithms.hetlora import hetlora

REGISTRY = {
    "fedit": fedit,
    "hetlora": hetlora,
}


def get_algorithm(name: str):
  try:
    return REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown algorithm {name!r}; known algorithms: {', '.join(sorted(REGISTRY))}") from None
