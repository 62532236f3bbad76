"""Cohort sampling: seeded, padded to a fixed cohort size with empty slots (-1)."""
from __future__ import annotations

import numpy as np


def sample_cohort(num_clients: int, cohort_size: int, *, seed: int, round_idx: int,
                  padded_size: int | None = None) -> np.ndarray:
  """Uniformly sample ``cohort_size`` distinct clients for round ``round_idx``.

  The draw is a pure function of (seed, round_idx). The result is sorted and
  padded with -1 up to ``padded_size`` (static cohort shape; empty slots get
  aggregation weight 0).
  """
  if cohort_size < 1 or cohort_size > num_clients:
    raise ValueError(f"cohort size must be in [1, num_clients={num_clients}], got {cohort_size}")
  padded_size = cohort_size if padded_size is None else padded_size
  if padded_size < cohort_size:
    raise ValueError(f"padded_size={padded_size} < cohort_size={cohort_size}")
  rng = np.random.default_rng([int(seed), int(round_idx), 0x5EED])
  ids = np.sort(rng.choice(num_clients, size=cohort_size, replace=False)).astype(np.int32)
  return np.concatenate([ids, -np.ones(padded_size - cohort_size, np.int32)])


def padded_cohort_size(cohort_size: int, chunk_size: int) -> int:
  """Smallest multiple of ``chunk_size`` that holds ``cohort_size`` clients."""
  return -(-cohort_size // chunk_size) * chunk_size
