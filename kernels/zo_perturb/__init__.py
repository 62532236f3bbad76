"""Zeroth-order perturbation x + scale * z(key) with counter-based noise (MeZO, FedKSeed): see api.py."""
from kernels.zo_perturb.api import IMPLS, KINDS, noise, perturb, resolve_impl

__all__ = ["IMPLS", "KINDS", "noise", "perturb", "resolve_impl"]
