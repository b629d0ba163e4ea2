"""libvirt's domain events as cujud sees them (issue 13 item 2): every event it subscribes to
reaches its listeners with its values, and each means what docs/failover.md's lifecycle
table says for a protected domain: a change the standby cannot follow ends protection
before the next epoch ships; anything else is one INFO line."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace
from typing import Any

import libvirt
import pytest

from cuju_libvirt.cujud import events, orchestrator
from cuju_libvirt.cujud.events import Action
from cuju_libvirt.cujud.virt import DOMAIN_EVENTS, DomainEvent, LibvirtConnection, LifecycleEvent
from cuju_libvirt.domain_xml import parse_domain
from cuju_libvirt.ft_engine.state import FTState
from cuju_libvirt.rig.domains import domain_xml
from tests.unit.test_virt_errors import FakeConn

pytestmark = pytest.mark.timeout(30)
UUID = "0f1e2d3c-0000-4000-8000-000000000013"


class RecordingConn(FakeConn):
    """Keeps each callback under the event id it was registered for."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.by_id: dict[int, Any] = {}

    def domainEventRegisterAny(self, dom: Any, event_id: int, cb: Any, opaque: Any) -> int:
        self.by_id[event_id] = cb
        return super().domainEventRegisterAny(dom, event_id, cb, opaque)


class FakeDom:
    def name(self) -> str:
        return "vm"

    def UUIDString(self) -> str:
        return UUID


#: The arguments libvirt-python passes between ``dom`` and ``opaque`` for each event.
SAMPLES: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "VIR_DOMAIN_EVENT_ID_DEVICE_ADDED": (("dimm0",), {"alias": "dimm0"}),
    "VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED": (("net1",), {"alias": "net1"}),
    "VIR_DOMAIN_EVENT_ID_JOB_COMPLETED": (({"operation": libvirt.VIR_DOMAIN_JOB_OPERATION_SNAPSHOT},),
                                          {"operation": "SNAPSHOT"}),
    "VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2": (("vda", libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY,
                                         libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED),
                                        {"disk": "vda", "type": "COPY", "status": "COMPLETED"}),
    "VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE": ((32768,), {"actual_kib": 32768}),
    "VIR_DOMAIN_EVENT_ID_PMSUSPEND": ((0,), {}),
    "VIR_DOMAIN_EVENT_ID_PMSUSPEND_DISK": ((0,), {"disk": True}),
    "VIR_DOMAIN_EVENT_ID_PMWAKEUP": ((0,), {}),
    "VIR_DOMAIN_EVENT_ID_REBOOT": ((), {}),
    "VIR_DOMAIN_EVENT_ID_MEMORY_DEVICE_SIZE_CHANGE": (("virtiomem0", 65536),
                                                      {"alias": "virtiomem0", "size_kib": 65536}),
}


def test_every_subscribed_event_reaches_the_listeners_with_its_values() -> None:
    made: list[RecordingConn] = []
    c = LibvirtConnection("x:///", opener=lambda uri: made.append(RecordingConn("a")) or made[-1])
    seen: list[DomainEvent] = []
    c.add_domain_listener(seen.append)
    c.open()
    try:
        conn = made[-1]
        assert {libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE} | {getattr(libvirt, n) for n, _, _ in DOMAIN_EVENTS} \
            == set(conn.by_id)
        for id_name, kind, _ in DOMAIN_EVENTS:
            args, info = SAMPLES[id_name]
            conn.by_id[getattr(libvirt, id_name)](conn, FakeDom(), *args, None)
            assert seen[-1] == DomainEvent("vm", UUID, kind, info), id_name
    finally:
        c.close()


def ev(kind: str, **info: Any) -> DomainEvent:
    return DomainEvent("vm", UUID, kind, info)


def life(event: str, detail: str) -> LifecycleEvent:
    return LifecycleEvent("vm", UUID, getattr(libvirt, f"VIR_DOMAIN_EVENT_{event}"),
                          getattr(libvirt, f"VIR_DOMAIN_EVENT_{event}_{detail}"))


@pytest.mark.parametrize(("event", "action", "words"), [
    (ev("device-added", alias="dimm0"), Action.RECONFIGURE, "device dimm0 was hot-plugged"),
    (ev("device-removed", alias="net1"), Action.RECONFIGURE, "detach-device"),
    (ev("memory-device-size-change", alias="vm0", size_kib=1), Action.RECONFIGURE, "memory device vm0"),
    (ev("block-job", disk="vda", type="COPY", status="COMPLETED"), Action.RECONFIGURE, "virsh blockcopy"),
    (ev("block-job", disk="vda", type="ACTIVE_COMMIT", status="COMPLETED"), Action.RECONFIGURE, "commit"),
    (ev("block-job", disk="vda", type="PULL", status="COMPLETED"), Action.RECONFIGURE, "blockpull"),
    (ev("block-job", disk="vda", type="COPY", status="READY"), Action.NOTE, "ends when the job pivots"),
    (ev("block-job", disk="vda", type="COPY", status="CANCELED"), Action.NOTE, "stays on its image"),
    (ev("block-job", disk="vda", type="BACKUP", status="COMPLETED"), Action.NOTE, "stays on its image"),
    (ev("job-completed", operation="SNAPSHOT"), Action.RECONFIGURE, "virsh snapshot-create"),
    (ev("balloon-change", actual_kib=1024), Action.NOTE, "setmem"),
    (ev("pm-suspend"), Action.NOTE, "protection ends while it sleeps"),
    (ev("pm-suspend", disk=True), Action.NOTE, "ends protection"),
    (ev("pm-wakeup"), Action.NOTE, "protects it again"),
    (ev("reboot"), Action.NOTE, "virsh reset"),
    (life("UNDEFINED", "REMOVED"), Action.RECONFIGURE, "virsh undefine"),
    (life("DEFINED", "UPDATED"), Action.RECONFIGURE, "virsh define"),
])
def test_what_each_event_means_for_a_protected_domain(event: Any, action: Action, words: str) -> None:
    found = events.verdict(event)
    assert found is not None and found.action is action and words in found.cause, found


@pytest.mark.parametrize("event", [
    ev("job-completed", operation="SAVE"), ev("job-completed", operation="MIGRATION_OUT"),
    life("SUSPENDED", "PAUSED"), life("RESUMED", "UNPAUSED"), life("DEFINED", "ADDED"),
])
def test_events_of_no_consequence_say_nothing(event: Any) -> None:
    assert events.verdict(event) is None


class FakeEngine:
    running = True

    def __init__(self) -> None:
        self.causes: list[str] = []

    def reconfigure(self, cause: str) -> None:
        self.causes.append(cause)


def primary(state: FTState) -> orchestrator.PrimaryDomain:
    orch: Any = SimpleNamespace()
    spec = parse_domain(domain_xml("vm", disk="/images/vm.img", metadata=[
        '<cuju:ft xmlns:cuju="https://cuju-ft.github.io/libvirt/ft/1.0" peer="hostb"/>']))
    assert spec is not None
    p = orchestrator.PrimaryDomain(orch, "vm", UUID, spec, "hostb")
    for step in {FTState.PROTECTED: (FTState.PAIRING, FTState.SYNCING, FTState.PROTECTED)}.get(state, ()):
        p.machine.move(step)
    return p


def test_a_protected_domain_ends_protection_on_a_change_and_notes_the_rest_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    p = primary(FTState.PROTECTED)
    engine = FakeEngine()
    p.engine = engine  # type: ignore[assignment]
    with caplog.at_level(logging.INFO, logger="cuju_libvirt.cujud.orchestrator"):
        p.on_event(ev("device-added", alias="dimm0"))
        for _ in range(3):
            p.on_event(ev("balloon-change", actual_kib=1024))
    assert len(engine.causes) == 1 and "dimm0" in engine.causes[0]
    assert [r.getMessage() for r in caplog.records].count(
        "the balloon holds the guest at 1024 KiB (virsh setmem): pages it gives back are replicated as zero "
        "pages") == 1


def test_an_unprotected_domain_is_not_reconfigured() -> None:
    p = primary(FTState.UNPROTECTED)
    engine = FakeEngine()
    p.engine = engine  # type: ignore[assignment]
    p.on_event(ev("device-added", alias="net1"))
    assert engine.causes == []


def test_the_orchestrator_routes_events_to_its_primaries_only() -> None:
    orch = orchestrator.Orchestrator.__new__(orchestrator.Orchestrator)
    orch._lock = threading.Lock()
    p = primary(FTState.PROTECTED)
    engine = FakeEngine()
    p.engine = engine  # type: ignore[assignment]
    orch.primaries = {UUID: p}
    orch._domain_event(ev("device-removed", alias="net1"))
    orch._domain_event(DomainEvent("other", "0f1e2d3c-0000-4000-8000-0000000000ff", "device-removed",
                                   {"alias": "net1"}))
    assert len(engine.causes) == 1


def test_a_disk_moved_to_an_overlay_without_any_event_is_a_reconfiguration() -> None:
    """`virsh snapshot-create --disk-only` sends no event: the live XML's image chain shows it."""
    before = events.disk_chains(domain_xml("vm", disk="/images/vm.img"))
    assert events.disks_changed(before, events.disk_chains(domain_xml("vm", disk="/images/vm.img"))) is None
    overlay = domain_xml("vm", disk="/images/vm.img").replace(
        "<source file=\"/images/vm.img\"/>",
        "<source file=\"/images/ov.qcow2\" index=\"2\"/><backingStore type=\"file\" index=\"1\">"
        "<format type=\"raw\"/><source file=\"/images/vm.img\"/></backingStore>")
    found = events.disks_changed(before, events.disk_chains(overlay))
    assert found is not None and found.action is Action.RECONFIGURE
    assert found.cause == "disk hda is on other images now (virsh snapshot-create --disk-only?)"
    gone = events.disks_changed(before, events.disk_chains(domain_xml("vm", kernel="/boot/vmlinuz")))
    assert gone is not None and gone.cause == "disk hda went"


def test_a_disk_resized_without_any_event_is_a_reconfiguration() -> None:
    """`virsh blockresize` sends no event: the capacity in libvirt's block stats shows it."""
    stats = {"block.count": 2, "block.0.name": "hda", "block.0.capacity": 1 << 20,
             "block.1.name": "hdb"}  # hdb's size hidden (a job held the domain): left out
    before = events.disk_sizes(stats)
    assert before == {"hda": 1 << 20}
    assert events.disks_resized(before, events.disk_sizes(stats)) is None
    grown = events.disk_sizes({**stats, "block.0.capacity": 2 << 20, "block.1.capacity": 4096})
    found = events.disks_resized(before, grown)
    assert found is not None and found.action is Action.RECONFIGURE
    assert found.cause == "disk hda was resized from 1048576 to 2097152 bytes (virsh blockresize)"
    assert events.disks_resized(before, {}) is None  # nothing read: nothing judged
