"""Compose PEFT families on one model; the trainable pytree is the union of their parameters.

    plan = apply_peft(model, ("prompt", "bitfit"), prompt={"length": 10}, bitfit={}, head=True)
    peft, base, trainable = split_model(model, plan.filter)

Families: ``lora`` (peft/lora.py), ``prompt`` (soft prompt), ``prefix`` (key/value
prefixes), ``adapter`` (Houlsby / Pfeiffer bottlenecks), ``bitfit`` (biases), ``partial``
(chosen blocks or their norms), ``full`` (every ``nnx.Param`` of the model: full-parameter tuning, e.g.
zeroth-order FedKSeed / MeZO). ``head=True`` also trains the classification head
(``classifier/...``) of an encoder classifier. Library code: options are plain dicts of
each family's keyword arguments (``train.py`` builds them from the config).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

from flax import nnx

from fedjax_llm.peft import adapter as adapter_lib
from fedjax_llm.peft import lora as lora_lib
from fedjax_llm.peft import prefix as prefix_lib
from fedjax_llm.peft import prompt as prompt_lib
from fedjax_llm.peft import selective
from fedjax_llm.peft.common import PeftParam, path_filter

FAMILIES = ("lora", "prompt", "prefix", "adapter", "bitfit", "partial", "full")


class PeftPlan(NamedTuple):
  filter: Any  # NNX filter of the trainable variables (put first in nnx.split)
  methods: tuple[str, ...]
  lora_paths: tuple[str, ...]  # LoRA-targeted linear layers (mutable-base methods need their kernels)
  partial_layers: tuple[int, ...]  # blocks selected by `partial` (empty if unused)
  added: dict  # family -> list of added module / parameter paths


def apply_peft(model: nnx.Module, methods: Sequence[str], *, lora: dict | None = None,
               prompt: dict | None = None, prefix: dict | None = None, adapter: dict | None = None,
               bitfit: dict | None = None, partial: dict | None = None, head: bool = False,
               seed: int = 0) -> PeftPlan:
  """Apply each family in ``methods`` (in order) with its options; returns the trainable filter."""
  methods = tuple(methods)
  bad = [m for m in methods if m not in FAMILIES]
  if bad:
    raise ValueError(f"unknown PEFT method {bad[0]!r}; allowed: {', '.join(FAMILIES)} (any combination)")
  if len(set(methods)) != len(methods):
    raise ValueError(f"peft methods {methods} list a family twice")
  if not methods and not head:
    raise ValueError("nothing to train: give at least one PEFT method (peft.methods) or train the head")
  filters: list = [nnx.LoRAParam, PeftParam]
  preds = []
  added: dict = {}
  lora_paths: tuple[str, ...] = ()
  partial_layers: tuple[int, ...] = ()
  for m in methods:
    if m == "lora":
      lora_paths = tuple(lora_lib.apply_lora(model, seed=seed, **(lora or {})))
      added[m] = list(lora_paths)
    elif m == "prompt":
      added[m] = prompt_lib.apply_prompt(model, seed=seed, **(prompt or {}))
    elif m == "prefix":
      added[m] = prefix_lib.apply_prefix(model, seed=seed, **(prefix or {}))
    elif m == "adapter":
      added[m] = adapter_lib.apply_adapters(model, seed=seed, **(adapter or {}))
    elif m == "bitfit":
      added[m], pred = selective.apply_bitfit(model, **(bitfit or {}))
      preds.append(pred)
    elif m == "partial":
      partial_layers, pred = selective.partial_predicate(model, **(partial or {}))
      preds.append(pred)
      added[m] = [f"layer {i}" for i in partial_layers]
    elif m == "full":
      filters.append(nnx.Param)
      added[m] = ["every parameter"]
  if head:
    preds.append(lambda path: path.startswith("classifier/"))
  if preds:
    filters.append(path_filter(lambda path: any(p(path) for p in preds)))
  return PeftPlan(nnx.Any(*filters), methods, lora_paths, partial_layers, added)
