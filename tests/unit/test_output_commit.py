"""Error paths of the output-commit filters against a fake monitor (real QEMU: integration)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest

from cuju_libvirt.errors import ReplicationError, StateError
from cuju_libvirt.ft_engine.output import (
    PCAP_HEADER,
    PCAP_RECORD,
    OutputCommit,
    OutputCommitError,
    _CounterWatch,
    discover_netdevs,
    leftover_filters,
    remove_leftovers,
)
from cuju_libvirt.qmp import QMPClient, QMPConnectionError, QMPError


class FakeQMP:
    """Records every command; ``fail`` maps (command, object id) to the error to raise."""

    def __init__(self, fail: dict[tuple[str, str], Exception] | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail or {}
        self.objects: list[str] = []
        self.answers: list[Any] = []

    def execute(self, command: str, arguments: dict[str, Any] | None = None, **_: Any) -> Any:
        args = arguments or {}
        self.calls.append((command, args))
        key = str(args.get("id") or args.get("path", "").rpartition("/")[2])
        if (command, key) in self.fail:
            raise self.fail[(command, key)]
        if command == "object-add":
            self.objects.append(args["id"])
            if args["qom-type"] == "filter-dump":
                Path(args["file"]).write_bytes(b"\0" * PCAP_HEADER)
        elif command == "object-del":
            self.objects.remove(args["id"])
        return {}

    def send(self, command: str, arguments: dict[str, Any] | None = None, **_: Any) -> int:
        """Run the command at once (as QEMU does, in order); :meth:`reply` hands out its outcome."""
        try:
            outcome: Any = self.execute(command, arguments)
        except Exception as err:  # QEMU's refusal travels in the answer
            outcome = err
        self.answers.append(outcome)
        return len(self.answers) - 1

    def reply(self, req_id: int, **_: Any) -> Any:
        outcome = self.answers[req_id]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def make(fake: FakeQMP, **kwargs: Any) -> OutputCommit:
    return OutputCommit(cast(QMPClient, fake), **kwargs)


def test_install_rolls_back_when_a_later_filter_fails(tmp_path: Path) -> None:
    fake = FakeQMP(
        {("object-add", "cuju-oc-net1-f1"): QMPError("object-add", "GenericError", "Vhost is not supported")}
    )
    oc = make(fake, counter_dir=tmp_path)
    with pytest.raises(
        OutputCommitError, match=r"netdev net1: Vhost is not supported.*<driver name='qemu'/>"
    ) as info:
        oc.install(["net0", "net1"])
    assert isinstance(info.value, ReplicationError)
    assert info.value.netdev == "net1" and info.value.qemu_message == "Vhost is not supported"
    assert fake.objects == []  # net0's three filters and net1's counter were deleted again
    deleted = [args["id"] for cmd, args in fake.calls if cmd == "object-del"]
    assert deleted == ["cuju-oc-net1-count", "cuju-oc-net0-f2", "cuju-oc-net0-f1", "cuju-oc-net0-count"]
    assert list(tmp_path.iterdir()) == []
    assert not oc.installed


def test_f2_is_inserted_before_f1_and_the_counter_stands_at_the_tail(tmp_path: Path) -> None:
    fake = FakeQMP()
    make(fake, counter_dir=tmp_path).install(["net0"])
    adds = {args["id"]: args for cmd, args in fake.calls if cmd == "object-add"}
    assert list(adds) == ["cuju-oc-net0-count", "cuju-oc-net0-f1", "cuju-oc-net0-f2"]
    assert "position" not in adds["cuju-oc-net0-count"]  # tail
    assert adds["cuju-oc-net0-f1"]["position"] == "id=cuju-oc-net0-count"
    assert adds["cuju-oc-net0-f2"]["position"] == "id=cuju-oc-net0-f1"
    assert adds["cuju-oc-net0-f1"]["insert"] == adds["cuju-oc-net0-f2"]["insert"] == "before"
    assert all(a["queue"] == "rx" for a in adds.values())


def test_counts_come_from_the_dump_files_size(tmp_path: Path) -> None:
    fake = FakeQMP()
    oc = make(fake, counter_dir=tmp_path)
    (one,) = oc.install(["net0"])
    assert one.counter_file is not None
    with one.counter_file.open("ab") as out:
        out.write(b"\0" * (PCAP_RECORD * 7))
    assert oc.pending_packets() == 7
    assert oc.boundary() == 0
    assert oc.pending_packets() == 0
    assert oc.stats.packets_closed == 7 and oc.stats.epoch_packets_max == 7
    assert oc.release(0) == 0 and oc.stats.packets_released == 7
    one.counter_file.unlink()
    with pytest.raises(OutputCommitError, match=r"counter .* is gone"):
        oc.pending_packets()


def test_wait_output_wakes_on_the_first_counted_packet_not_at_its_timeout(tmp_path: Path) -> None:
    fake = FakeQMP()
    oc = make(fake, counter_dir=tmp_path)
    (one,) = oc.install(["net0"])
    assert one.counter_file is not None
    t0 = time.monotonic()
    assert oc.wait_output(0.05) == 0  # nothing held: it waits out its timeout
    assert time.monotonic() - t0 >= 0.05

    def packet() -> None:
        time.sleep(0.2)
        with one.counter_file.open("ab") as out:  # type: ignore[union-attr]
            out.write(b"\0" * PCAP_RECORD)

    writer = threading.Thread(target=packet)
    t0 = time.monotonic()
    writer.start()
    assert oc.wait_output(60.0) == 1  # woken by the write, long before 60 s
    assert time.monotonic() - t0 < 30.0
    assert isinstance(oc._watch, _CounterWatch)  # inotify woke it, not a poll
    writer.join()
    assert oc.wait_output(60.0) == 1  # a held packet returns at once
    oc.remove()
    assert oc._watch is None


def test_wait_output_without_counting_only_sleeps() -> None:
    oc = make(FakeQMP())
    oc.install(["net0"])
    assert oc.wait_output(0.01) is None


def test_a_failed_toggle_raises_with_the_filter_and_netdev() -> None:
    fake = FakeQMP({("qom-set", "cuju-oc-net0-f1"): QMPConnectionError("QMP connection lost")})
    oc = make(fake)
    oc.install(["net0"])
    with pytest.raises(OutputCommitError, match="filter cuju-oc-net0-f1 of netdev net0 off") as info:
        oc.boundary()
    assert oc.held_epoch is None and oc.stats.boundaries == 0
    # cujud reads a lost monitor (QEMU exiting: virsh destroy) from the cause
    assert isinstance(info.value.__cause__, QMPConnectionError)


class OrderedQMP(FakeQMP):
    """Also notes when each answer is collected."""

    def __init__(self, fail: dict[tuple[str, str], Exception] | None = None) -> None:
        super().__init__(fail)
        self.log: list[str] = []

    def send(self, command: str, arguments: dict[str, Any] | None = None, **kw: Any) -> int:
        self.log.append("send")
        return super().send(command, arguments, **kw)

    def reply(self, req_id: int, **kw: Any) -> Any:
        self.log.append("reply")
        return super().reply(req_id, **kw)


def test_a_boundary_and_a_release_send_every_switch_before_the_first_answer() -> None:
    fake = OrderedQMP()
    oc = make(fake)
    oc.install(["net0", "net1"])
    fake.log.clear()
    oc.begin_boundary()
    assert fake.log == ["send"] * 4  # nothing waited for: the caller may harvest meanwhile
    assert oc.held_epoch is None
    assert oc.finish_boundary() == 0 and oc.held_epoch == 0
    assert fake.log == ["send"] * 4 + ["reply"] * 4
    fake.log.clear()
    assert oc.release(0) == 0
    assert fake.log == ["send"] * 4 + ["reply"] * 4
    switches = [(a["path"].rpartition("/")[2], a["value"]) for c, a in fake.calls if c == "qom-set"]
    assert switches == [  # in order: each netdev's F1 off and on, then each F2 off and on
        ("cuju-oc-net0-f1", "off"), ("cuju-oc-net0-f1", "on"), ("cuju-oc-net1-f1", "off"),
        ("cuju-oc-net1-f1", "on"), ("cuju-oc-net0-f2", "off"), ("cuju-oc-net0-f2", "on"),
        ("cuju-oc-net1-f2", "off"), ("cuju-oc-net1-f2", "on"),
    ]  # fmt: skip


def test_a_refused_switch_is_reported_after_every_answer_is_collected() -> None:
    refused = QMPError("qom-set", "GenericError", "no such object")
    fake = OrderedQMP({("qom-set", "cuju-oc-net0-f1"): refused})
    oc = make(fake)
    oc.install(["net0", "net1"])
    fake.log.clear()
    with pytest.raises(OutputCommitError, match="cuju-oc-net0-f1 of netdev net0 off: no such object") as info:
        oc.boundary()
    assert info.value.netdev == "net0"
    assert fake.log == ["send"] * 4 + ["reply"] * 4  # no answer is left behind on the monitor
    assert oc.held_epoch is None and oc.stats.boundaries == 0
    with pytest.raises(StateError, match="no epoch boundary was begun"):
        oc.finish_boundary()


def test_remove_tries_every_filter_and_reports_what_is_left() -> None:
    fake = FakeQMP()
    oc = make(fake)
    oc.install(["net0", "net1"])
    fake.fail[("object-del", "cuju-oc-net0-f2")] = QMPError("object-del", "GenericError", "busy")
    with pytest.raises(OutputCommitError, match="net0"):
        oc.remove()
    assert fake.objects == ["cuju-oc-net0-f2"]
    assert [f.netdev for f in oc.filters] == ["net0"]
    statuses = [(a["path"], a["value"]) for c, a in fake.calls if c == "qom-set"]
    assert statuses == [  # everything was released first: F1 into F2, then F2 out
        ("/objects/cuju-oc-net0-f1", "off"), ("/objects/cuju-oc-net0-f2", "off"),
        ("/objects/cuju-oc-net1-f1", "off"), ("/objects/cuju-oc-net1-f2", "off"),
    ]  # fmt: skip


def test_bad_netdev_lists_are_refused() -> None:
    oc = make(FakeQMP())
    with pytest.raises(OutputCommitError, match="twice"):
        oc.install(["net0", "net0"])
    with pytest.raises(StateError, match="not installed"):
        oc.release()


class DiscoveryQMP:
    def execute(self, command: str, arguments: dict[str, Any] | None = None, **_: Any) -> Any:
        path = (arguments or {}).get("path")
        if command == "qom-list" and path == "/machine/peripheral":
            return [{"name": "net0", "type": "child<virtio-net-pci>"}, {"name": "type", "type": "string"}]
        if command == "qom-list" and path == "/machine/peripheral-anon":
            return [
                {"name": "device[0]", "type": "child<e1000>"},
                {"name": "device[1]", "type": "child<isa-serial>"},
            ]
        if command == "qom-list":
            has_netdev = not str(path).endswith("device[1]")
            return [{"name": "netdev", "type": "str"}] if has_netdev else [{"name": "chardev", "type": "str"}]
        if command == "qom-get":
            return {"/machine/peripheral/net0": "hostnet0", "/machine/peripheral-anon/device[0]": "hostnet1"}[
                path
            ]
        raise AssertionError(command)


def test_discovery_reads_each_nics_netdev_property() -> None:
    assert discover_netdevs(cast(QMPClient, DiscoveryQMP())) == ["hostnet0", "hostnet1"]


def test_leftover_filters_are_found_released_in_order_and_deleted() -> None:
    """Issue 13 item 4: a dead cujud's filters stay in QEMU; the next pairing failed on
    "attempt to add duplicate property 'cuju-...-f1'". They are found by their ids and
    removed: F1 off before F2 (F1's packets queue behind F2's older ones), then deleted."""
    names = ["cuju-vm-hostnet0-f2", "cuju-vm-hostnet0-count", "cuju-vm-hostnet0-f1", "cuju-vmx-hostnet0-f1",
             "other", "cuju-vm-hostnet0-f1x"]

    class Listing(FakeQMP):
        def execute(self, command: str, arguments: dict[str, Any] | None = None, **kw: Any) -> Any:
            if command == "qom-list":
                return [{"name": n, "type": "child<filter-buffer>"} for n in self.objects]
            return super().execute(command, arguments, **kw)

    fake = Listing()
    fake.objects = list(names)
    found = leftover_filters(fake, "vm")  # type: ignore[arg-type]
    assert found == ["cuju-vm-hostnet0-count", "cuju-vm-hostnet0-f1", "cuju-vm-hostnet0-f2"]
    fake.calls.clear()
    remove_leftovers(fake, found)  # type: ignore[arg-type]
    assert fake.calls == [
        ("qom-set", {"path": "/objects/cuju-vm-hostnet0-f1", "property": "status", "value": "off"}),
        ("qom-set", {"path": "/objects/cuju-vm-hostnet0-f2", "property": "status", "value": "off"}),
        ("object-del", {"id": "cuju-vm-hostnet0-f1"}),
        ("object-del", {"id": "cuju-vm-hostnet0-f2"}),
        ("object-del", {"id": "cuju-vm-hostnet0-count"}),
    ]
    assert sorted(fake.objects) == ["cuju-vm-hostnet0-f1x", "cuju-vmx-hostnet0-f1", "other"]
