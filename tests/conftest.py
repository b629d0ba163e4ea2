"""Shared pytest configuration: tier markers come from the folder a test lives in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    slow_ok = os.environ.get("CUJU_SLOW") == "1"
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
        if "slow" in item.keywords and not slow_ok:
            item.add_marker(pytest.mark.skip(reason="slow soak: opt in with CUJU_SLOW=1"))


# Hypothesis: no per-example deadline (this machine is shared and slow at times), a bounded
# number of examples so the suite stays fast; HYPOTHESIS_PROFILE=thorough for a longer run.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    pass
else:
    settings.register_profile(
        "cuju", deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.register_profile(
        "thorough", deadline=None, max_examples=2000, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "cuju"))
