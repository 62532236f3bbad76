"""Shared pytest configuration."""

import os
import tempfile

import jax

jax.config.update("jax_threefry_partitionable", True)

# One persistent XLA compilation cache for the whole session (shared by the xdist workers): the many tests
# that rebuild the same round (train.run resumes, conformance loops, smoke runs) compile it once.
_CACHE = os.environ.get("FEDJAX_TEST_COMPILE_CACHE") or os.path.join(tempfile.gettempdir(), "fedjax_llm_xla_cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slow test (real model weights); still runs in CI")
    config.addinivalue_line("markers", "extended: extra variants of a check CI already makes; `make test-all` runs "
                                       "them, CI's `make test` does not (suite time budget)")
