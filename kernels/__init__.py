"""Accelerator kernels, one folder per op (``api.py`` dispatch, ``reference.py`` jnp, ``pallas_*.py``).

* ``zo_perturb/``: counter-based Threefry-2x32 noise (Gaussian / Rademacher) and ``theta + c z(key)`` tile
  by tile, for the zeroth-order methods (z is regenerated, never stored).
* ``lora_matmul/``: y = x W + s (x a) b for a cohort sharing W, one fused Pallas kernel with its custom_vjp.

``dispatch.py`` holds the ``impl`` switch (auto / xla / pallas / interpret) both share.
"""
