"""Shared pytest configuration."""

import jax

jax.config.update("jax_threefry_partitionable", True)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slow test (real model weights); still runs in CI")
