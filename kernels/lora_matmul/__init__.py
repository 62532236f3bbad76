"""Multi-client LoRA matmul y = x W + s ((x a) * mask(rank)) b, W shared and frozen: see api.py."""
from kernels.lora_matmul.api import IMPLS, lora_matmul, lora_matmul_cohort, resolve_impl

__all__ = ["IMPLS", "lora_matmul", "lora_matmul_cohort", "resolve_impl"]
