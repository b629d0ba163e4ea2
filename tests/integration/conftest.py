"""Fixtures the integration tests share."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A scratch directory on tmpfs (the standby's RAM file lives in memory too); removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="dataplane-test-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
