"""Shared fixtures: seeded rng and generated images. Real Redis and servers are started
by the fixtures of the folders that need them."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261122)
