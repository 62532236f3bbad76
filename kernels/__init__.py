"""Accelerator kernels, one folder per op (``api.py`` dispatch, ``reference.py`` jnp, ``pallas_*.py``).

* ``zo_perturb/``: counter-based Threefry-2x32 noise (Gaussian / Rademacher) and ``theta + c z(key)`` tile
  by tile, for the zeroth-order methods (z is regenerated, never stored).

The multi-client LoRA matmul lands here next (see docs/ARCHITECTURE.md).
"""
