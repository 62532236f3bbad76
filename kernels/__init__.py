"""Accelerator kernels, one folder per op (``api.py`` dispatch, ``reference.py`` jnp, ``pallas_*.py``).

Empty for now: the spine runs on XLA everywhere. The multi-client LoRA matmul and the
zeroth-order perturbation kernels land here (see docs/ARCHITECTURE.md).
"""
