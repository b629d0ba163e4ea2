"""The epoch policy: its setting in <cuju:ft> and in the engine's configuration agree."""

from __future__ import annotations

import pytest

from cuju_libvirt import domain_xml as dx
from cuju_libvirt.ft_engine.epoch import EPOCH_POLICIES, PrimaryConfig


def test_policies_match_the_element() -> None:
    attr = dx.ATTRIBUTE_BY_NAME["epoch-policy"]
    assert attr.choices == EPOCH_POLICIES
    assert attr.default == PrimaryConfig(ram_path="x", ram_size=4096).epoch_policy == "output"


def test_engine_refuses_an_unknown_policy() -> None:
    with pytest.raises(ValueError, match="epoch_policy 'sometimes' must be one of output, fixed"):
        PrimaryConfig(ram_path="x", ram_size=4096, epoch_policy="sometimes")


def test_element_round_trips_the_policy() -> None:
    spec = dx.FTSpec.from_attributes({"peer": "hostb", "epoch-policy": "fixed"})
    assert spec.epoch_policy == "fixed"
    assert spec.to_attributes() == {"peer": "hostb", "epoch-policy": "fixed"}


def test_max_epoch_matches_the_element() -> None:
    attr = dx.ATTRIBUTE_BY_NAME["max-epoch-ms"]
    assert attr.default == PrimaryConfig(ram_path="x", ram_size=4096).max_epoch_ms == 100
    with pytest.raises(ValueError, match="max_epoch_ms 0 must be in"):
        PrimaryConfig(ram_path="x", ram_size=4096, max_epoch_ms=0)
