"""Pieces of the orchestration that can be checked without a rig: the standby's XML, the
records, what a QEMU left in its log and on its command line, and the rule that a standby
promised away never takes over (and a taken-over one is never promised away)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import libvirt
import pytest
from lxml import etree

from cuju_libvirt import domain_xml as dx
from cuju_libvirt import fitness
from cuju_libvirt.cujud import orchestrator, records
from cuju_libvirt.cujud import standby as standby_mod
from cuju_libvirt.cujud.qemu_process import ended_on_signal, log_offset, ram_backing
from cuju_libvirt.cujud.standby import Standby, StandbyManager, is_standby_xml, standby_xml
from cuju_libvirt.cujud.virt import LifecycleEvent
from cuju_libvirt.domain_xml import parse_domain
from cuju_libvirt.errors import CujuError, StateError
from cuju_libvirt.ft_engine.state import FTState
from cuju_libvirt.rig.domains import domain_xml
from tests.domains import LIBVIRT_DOMAIN_RNG


def test_standby_xml_leaves_the_shared_disks_labels_to_the_primary() -> None:
    xml = domain_xml("vm", disk="/images/vm.img")
    root = etree.fromstring(standby_xml(xml).encode())
    sources = root.findall("devices/disk/source")
    assert sources
    for source in sources:
        labels = source.findall("seclabel")
        assert [(x.get("model"), x.get("relabel")) for x in labels] == [("dac", "no")]
    again = standby_xml(etree.tostring(root, encoding="unicode"))  # an existing dac label is kept
    assert len(etree.fromstring(again.encode()).findall("devices/disk/source/seclabel")) == len(sources)


def test_standby_xml_labels_no_served_disk_so_libvirts_schema_accepts_it() -> None:
    """A served disk is an NBD socket, no image file: a seclabel on its network <source> is
    refused by libvirt's domain.rng (and there is nothing to relabel)."""
    plain = domain_xml("vm", kernel="/boot/vmlinuz", data_disk="/images/vm-data.img")
    prepared = fitness.prepare(dx.set_ft(plain, dx.FTSpec.defaults("hostb"))).xml
    root = etree.fromstring(standby_xml(prepared).encode())
    (disk,) = root.findall("devices/disk")
    assert disk.get("type") == "network" and disk.findall("source/seclabel") == []
    if LIBVIRT_DOMAIN_RNG.exists():
        rng = etree.RelaxNG(etree.parse(str(LIBVIRT_DOMAIN_RNG)))
        assert rng.validate(root), rng.error_log


def test_standby_xml_adds_incoming_defer_and_is_recognised() -> None:
    xml = domain_xml("vm", kernel="/boot/vmlinuz", qemu_args=("-qmp", "unix:/x.sock,server=on,wait=off"))
    assert not is_standby_xml(xml.encode())
    sb = standby_xml(xml)
    assert is_standby_xml(sb.encode())
    assert sb.index("-qmp") < sb.index("-incoming") < sb.index("defer")
    plain = standby_xml(domain_xml("vm", kernel="/boot/vmlinuz"))  # no <qemu:commandline> yet
    assert is_standby_xml(plain.encode()) and "xmlns:qemu" in plain
    # the live XML of a VM that failed over still has it: re-protected, it gets no second one
    assert standby_xml(sb).count("-incoming") == 1 and standby_xml(sb).count("defer") == 1


def test_records_round_trip_and_refuse_odd_uuids(tmp_path: Path) -> None:
    uuid = "0f1e2d3c-0000-4000-8000-000000000001"
    assert records.read(tmp_path, records.CEDED, uuid) is None
    records.write(tmp_path, records.CEDED, uuid, peer="hostb", reason="test")
    got = records.read(tmp_path, records.CEDED, uuid)
    assert got is not None and got["peer"] == "hostb" and got["uuid"] == uuid
    assert (tmp_path / "ceded").stat().st_mode & 0o777 == 0o700
    assert records.remove(tmp_path, records.CEDED, uuid) and not records.remove(tmp_path, records.CEDED, uuid)
    for bad in ("", "../x", ".hidden", "a/b"):
        with pytest.raises(ValueError):
            records.write(tmp_path, records.CEDED, bad)


def test_signal_line_in_the_log_after_the_offset_only(tmp_path: Path) -> None:
    log = tmp_path / "vm.log"
    log.write_text("2026 qemu-system-x86_64: terminating on signal 15 from pid 1 (libvirtd)\n")
    offset = log_offset("vm", tmp_path)
    assert ended_on_signal("vm", 0, tmp_path) == 15
    assert ended_on_signal("vm", offset, tmp_path) is None  # an earlier run's line does not count
    with open(log, "a") as fh:
        fh.write("qemu-system-x86_64: terminating on signal 2\n")
    assert ended_on_signal("vm", offset, tmp_path) == 2
    assert ended_on_signal("missing", 0, tmp_path) is None


def wait_exec(pid: int, marker: bytes) -> None:
    """Until the child's /proc command line is the exec'd one (vfork + exec may lag a moment)."""
    for _ in range(200):
        if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} never showed {marker!r} on its command line")


def test_ram_backing_read_from_a_real_process_command_line(tmp_path: Path) -> None:
    ram = tmp_path / "pc.ram"
    ram.write_bytes(b"\0" * 8192)
    obj = json.dumps({"qom-type": "memory-backend-file", "id": "pc.ram", "mem-path": str(ram), "share": True})
    code = "import sys, time; time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code, "-object", obj])
    try:
        wait_exec(proc.pid, b"-object")
        found = ram_backing(proc.pid)
        assert found.path == str(ram) and found.size == 8192
    finally:
        proc.kill()
        proc.wait()
    none = subprocess.Popen([sys.executable, "-c", code])
    try:
        wait_exec(none.pid, b"time.sleep")
        with pytest.raises(CujuError, match="no file-backed guest RAM"):
            ram_backing(none.pid)
    finally:
        none.kill()
        none.wait()
    # a hot-plugged DIMM (libvirt's memdimm0 backend) beside the cell's RAM: refused, naming
    # both backends and what to do
    dimm = json.dumps({"qom-type": "memory-backend-file", "id": "memdimm0", "mem-path": str(ram)})
    two = subprocess.Popen([sys.executable, "-c", code, "-object", obj.replace("pc.ram", "ram-node0", 1),
                            "-object", dimm])
    try:
        wait_exec(two.pid, b"memdimm0")
        with pytest.raises(CujuError, match=r"2 RAM backends \(ram-node0, memdimm0\).*virsh detach-device"):
            ram_backing(two.pid)
    finally:
        two.kill()
        two.wait()


class FakeEngine:
    """Stands in for BackupEngine: failover() only records that it ran."""

    def __init__(self) -> None:
        self.failovers = 0
        self.closed = False

    def failover(self) -> Any:
        self.failovers += 1
        return SimpleNamespace(epoch=7, total_s=0.01)

    def close(self) -> None:
        self.closed = True

    def consistent(self) -> bool:
        return self.holds_epoch

    holds_epoch = True


def make_standby(tmp_path: Path, verdicts: list[str] | None = None, *,
                 persistent: bool = False, peer_says: list[str | None] | None = None
                 ) -> tuple[Standby, list[str]]:
    """A standby with fakes around it; ``verdicts``: what the witness answers, claim by claim
    (none: no witness); ``persistent``: the domain is also defined on this host; ``peer_says``:
    the peer's answers to ``vm-state``, one per question (None: no answer; the last repeats)."""
    events: list[str] = []
    answers = list(peer_says or [None])

    def ask_peer(name: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        events.append(kind)
        said = answers.pop(0) if len(answers) > 1 else answers[0]
        if said is None:
            raise CujuError(f"peer {name} is not connected")
        return {"state": said}

    def claim(sb: Standby, quiet: bool = False) -> str:
        if verdicts is None:
            return "unwitnessed"
        events.append("claim")
        return verdicts.pop(0)

    live = standby_xml(domain_xml("vm", kernel="/boot/vmlinuz"))
    dom = SimpleNamespace(isPersistent=lambda: persistent, isActive=lambda: True, XMLDesc=lambda flags: live,
                          destroy=lambda: events.append("destroy"))
    conn = SimpleNamespace(defineXML=lambda xml: events.append("define"), lookupByName=lambda name: dom,
                           lookupByUUIDString=lambda uuid: dom)
    manager: Any = SimpleNamespace(
        libvirt=SimpleNamespace(conn=conn), state_dir=tmp_path, ft=SimpleNamespace(forget=lambda t: None),
        taken_over=lambda sb: events.append("taken_over"), forget=lambda sb: events.append("forget"),
        claim=claim, settle_later=lambda sb: events.append("settle_later"), ask_peer=ask_peer,
        witness=None if verdicts is None else object(),
    )
    sb = Standby(manager, name="vm", uuid="0f1e2d3c-0000-4000-8000-000000000002", peer="hosta",
                 xml="<domain/>", persistent_xml="<domain/>", timeout_s=0.5, auto_failover=True,
                 generation=0 if verdicts is None else 4)
    sb.engine = FakeEngine()  # type: ignore[assignment]
    sb.machine.move(FTState.STANDBY)
    return sb, events


def test_a_promised_away_standby_never_takes_over(tmp_path: Path) -> None:
    sb, events = make_standby(tmp_path)
    assert sb.abandon("the primary runs on") == {"abandoned": True}
    assert sb.take_over("primary declared dead")["taken_over"] is False
    assert sb.engine is not None and sb.engine.failovers == 0  # type: ignore[attr-defined]
    assert records.read(tmp_path, records.TAKEOVERS, sb.uuid) is None
    for t in threading.enumerate():
        if t.name.startswith("cujud-drop"):
            t.join(5)
    assert "destroy" in events and "forget" in events


def test_a_taken_over_standby_is_never_promised_away(tmp_path: Path) -> None:
    sb, events = make_standby(tmp_path)
    assert sb.take_over("primary declared dead") == {"taken_over": True, "epoch": 7}
    assert sb.abandon("too late") == {"abandoned": False, "taken_over": True}
    assert sb.take_over("again") == {"taken_over": True}  # once only
    assert sb.engine is not None and sb.engine.failovers == 1  # type: ignore[attr-defined]
    assert records.read(tmp_path, records.TAKEOVERS, sb.uuid) is not None
    assert events == ["define", "taken_over"] and sb.stats.role == "primary"


def test_a_standby_on_the_old_primary_host_is_destroyed_though_the_domain_is_defined_there(
    tmp_path: Path,
) -> None:
    """Re-protected after a failover, the standby runs on the host that still has the domain's
    definition: dropping it must destroy its QEMU all the same (the definition stays)."""
    sb, events = make_standby(tmp_path, persistent=True)
    assert sb.abandon("the primary runs on") == {"abandoned": True}
    assert sb.gone.wait(5)
    assert events.count("destroy") == 1


def test_a_takeover_makes_the_ceded_record_of_an_earlier_failover_stale(tmp_path: Path) -> None:
    sb, _events = make_standby(tmp_path, persistent=True)
    records.write(tmp_path, records.CEDED, sb.uuid, peer="hosta", reason="an earlier failover")
    assert sb.take_over("primary declared dead")["taken_over"] is True
    assert records.read(tmp_path, records.CEDED, sb.uuid) is None  # this host holds the VM now
    assert records.read(tmp_path, records.TAKEOVERS, sb.uuid) is not None


def fake_manager(tmp_path: Path, *, active: bool, xml: str) -> tuple[Any, list[str]]:
    events: list[str] = []
    dom = SimpleNamespace(isActive=lambda: active, XMLDesc=lambda flags: xml,
                          destroy=lambda: events.append("destroy"))
    return SimpleNamespace(libvirt=SimpleNamespace(conn=SimpleNamespace(lookupByUUIDString=lambda u: dom)),
                           state_dir=tmp_path), events


def test_a_new_standby_is_refused_where_the_vm_runs_and_replaces_an_orphaned_one(tmp_path: Path) -> None:
    uuid = "0f1e2d3c-0000-4000-8000-000000000003"
    plain = domain_xml("vm", kernel="/boot/vmlinuz")
    running, events = fake_manager(tmp_path, active=True, xml=plain)
    with pytest.raises(StateError, match="runs on this host"):
        StandbyManager._clear_stale_copy(running, "vm", uuid, "hostb")
    # a VM that failed over here keeps -incoming in its live XML: the takeover record tells it apart
    taken, events2 = fake_manager(tmp_path, active=True, xml=standby_xml(plain))
    records.write(tmp_path, records.TAKEOVERS, uuid, peer="hostb")
    with pytest.raises(StateError, match="runs on this host"):
        StandbyManager._clear_stale_copy(taken, "vm", uuid, "hostb")
    records.remove(tmp_path, records.TAKEOVERS, uuid)
    StandbyManager._clear_stale_copy(taken, "vm", uuid, "hostb")  # an orphaned standby: destroyed
    inactive, events3 = fake_manager(tmp_path, active=False, xml=plain)
    StandbyManager._clear_stale_copy(inactive, "vm", uuid, "hostb")  # only defined here: nothing to do
    assert events == [] and events2 == ["destroy"] and events3 == []


def _join_drops() -> None:
    for t in threading.enumerate():
        if t.name.startswith("cujud-drop"):
            t.join(5)


def test_a_standby_that_loses_the_witness_race_is_dropped_never_resumed(tmp_path: Path) -> None:
    sb, events = make_standby(tmp_path, verdicts=["lost"])
    assert sb.take_over("primary declared dead")["taken_over"] is False
    _join_drops()
    assert sb.engine is not None and sb.engine.failovers == 0  # type: ignore[attr-defined]
    assert sb.abandoned and "destroy" in events
    assert records.read(tmp_path, records.TAKEOVERS, sb.uuid) is None


def test_no_answer_from_the_witness_never_resumes_on_silence_nor_promises(tmp_path: Path) -> None:
    """The claim may have been applied: until an answer, no resume and no promise to the primary."""
    sb, events = make_standby(tmp_path, verdicts=["unknown", "unknown", "won"])
    assert sb.take_over("primary declared dead") == {"taken_over": False, "undecided": True}
    assert sb.abandon("a fenced primary asks") == {"abandoned": False, "taken_over": False, "undecided": True}
    assert sb.take_over("primary declared dead")["undecided"]
    assert sb.engine is not None and sb.engine.failovers == 0  # type: ignore[attr-defined]
    assert sb.take_over("primary declared dead") == {"taken_over": True, "epoch": 7}
    assert events == ["claim", "claim", "claim", "define", "taken_over"]


def test_the_primarys_word_resumes_without_the_witness_and_settles_later(tmp_path: Path) -> None:
    sb, events = make_standby(tmp_path, verdicts=["unknown"])
    assert sb.take_over("the primary's cujud reports its QEMU crashed", by_word=True)["taken_over"] is True
    assert events == ["claim", "settle_later", "define", "taken_over"]


def test_the_pairing_backoff_waits_what_the_log_says(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Issue 13 item 4: "next attempt in 30 s", then a retry ~6 ms later. A failed pairing's
    clean-up wakes the protection loop (the engine's verdict asks for a re-protection), and
    that wake must not cut the back-off short."""
    monkeypatch.setattr(orchestrator, "BACKOFF_MIN", 0.2)
    monkeypatch.setattr(orchestrator, "BACKOFF_MAX", 0.8)
    spec = parse_domain(domain_xml("vm", disk="/images/vm.img", metadata=[
        '<cuju:ft xmlns:cuju="https://cuju-ft.github.io/libvirt/ft/1.0" peer="hostb"/>']))
    assert spec is not None
    orch: Any = SimpleNamespace(stopping=threading.Event())
    p = orchestrator.PrimaryDomain(orch, "vm", "0f1e2d3c-0000-4000-8000-000000000003", spec, "hostb")
    attempts: list[float] = []

    def failing_pairing() -> None:
        attempts.append(time.monotonic())
        p._wake.set()  # what a failed pairing's clean-up does (a re-protection is asked for)
        raise CujuError("the peer refused")

    monkeypatch.setattr(p, "_pair_once", failing_pairing)
    monkeypatch.setattr(p, "_vm_gone", lambda: False)  # the VM runs on (no libvirt here)
    caplog.set_level("WARNING", logger="cuju_libvirt.cujud.orchestrator")
    p.start()
    deadline = time.monotonic() + 10
    while len(attempts) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    orch.stopping.set()
    p._wake.set()
    assert p._thread is not None
    p._thread.join(5)
    assert len(attempts) >= 5
    waits = [b - a for a, b in itertools.pairwise(attempts)]
    said = [float(r.getMessage().rsplit("next attempt in ", 1)[1].split(" s")[0])
            for r in caplog.records if "next attempt in" in r.getMessage()]
    for waited, wanted in zip(waits[:4], [0.2, 0.4, 0.8, 0.8], strict=True):
        assert waited >= wanted - 0.02, (waits, said)
    assert said[:4] == pytest.approx([0.2, 0.4, 0.8, 0.8])


@pytest.mark.parametrize(("signal_line", "events", "cause"), [
    (None, [], "SIGKILL"),
    (None, [("STOPPED", "CRASHED")], "crash: the guest crashed"),
    (None, [("STOPPED", "FAILED")], "crash: QEMU failed"),
    (15, [("SHUTDOWN", "GUEST"), ("STOPPED", "SHUTDOWN")], "deliberate: the guest powered off"),
    (15, [("SHUTDOWN", "HOST"), ("STOPPED", "SHUTDOWN")], "from the host (virsh shutdown)"),
    (15, [("STOPPED", "SAVED")], "deliberate: virsh save"),
    (15, [("STOPPED", "DESTROYED")], "deliberate: virsh destroy"),
    (15, [], "deliberate: QEMU terminated on signal 15 (SIGTERM)"),
])
def test_the_end_of_a_qemu_is_logged_with_its_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signal_line: int | None,
    events: list[tuple[str, str]], cause: str,
) -> None:
    """Issue 13 items 6 and 9: guest power-off and 'virsh save' were both logged as "QEMU
    terminated on signal 15"; a SIGKILL as a vanished QEMU. libvirt's events name the cause."""
    uuid = "0f1e2d3c-0000-4000-8000-000000000005"
    monkeypatch.setattr(orchestrator, "CLASSIFY_WAIT", 0.01)
    monkeypatch.setattr(orchestrator, "DELIBERATE_WAIT", 0.05)
    monkeypatch.setattr(orchestrator, "ended_on_signal", lambda name, since: signal_line)
    conn: Any = SimpleNamespace(add_lifecycle_listener=lambda f: None, add_state_listener=lambda f: None)
    orch = orchestrator.Orchestrator.__new__(orchestrator.Orchestrator)
    orch._stops, orch._shutdowns, orch._stop_cond = {}, {}, threading.Condition()
    orch._lock, orch.primaries, orch.libvirt = threading.Lock(), {}, conn
    for kind, detail in events:
        ev_num = getattr(libvirt, f"VIR_DOMAIN_EVENT_{kind}")
        detail_num = getattr(libvirt, f"VIR_DOMAIN_EVENT_{kind}_{detail}")
        orch._lifecycle(LifecycleEvent("vm", uuid, ev_num, detail_num))
    spec = parse_domain(domain_xml("vm", disk="/images/vm.img", metadata=[
        '<cuju:ft xmlns:cuju="https://cuju-ft.github.io/libvirt/ft/1.0" peer="hostb"/>']))
    assert spec is not None
    p = orchestrator.PrimaryDomain(orch, "vm", uuid, spec, "hostb")
    how = p._classify_exit()
    assert cause in how, how
    assert how.startswith("crash" if signal_line is None else "deliberate")


def test_an_ft_link_of_another_generation_is_refused(tmp_path: Path) -> None:
    """The generation travels in the FT-link handshake: a link made for an older pairing
    (a stale primary) never feeds this standby."""
    sb, _ = make_standby(tmp_path, verdicts=[])
    with pytest.raises(StateError, match=r"generation 3 .* paired at generation 4"):
        sb._linked(None, 3)  # type: ignore[arg-type]
    assert sb.link is None


class FakeLinks(dict[str, object]):
    """Configured peers; ``up`` names the connected ones."""

    def __init__(self, names: list[str], up: set[str]) -> None:
        super().__init__((n, object()) for n in names)
        self.up = up

    def connection(self, name: str) -> object:
        if name not in self.up:
            raise CujuError(f"peer {name} is not connected")
        return object()


def test_placement_keeps_a_connected_backup_and_otherwise_balances_over_connected_peers() -> None:
    primaries = {u: SimpleNamespace(uuid=u, peer=peer) for u, peer in
                 (("u1", "hostb"), ("u2", "hostb"), ("u3", "hostc"))}
    orch: Any = SimpleNamespace(links=FakeLinks(["hostb", "hostc", "hostd"], {"hostb", "hostc", "hostd"}),
                                primaries=primaries, _lock=threading.Lock())

    orch.connected_peers = lambda: orchestrator.Orchestrator.connected_peers(orch)

    def place(uuid: str, prefer: str | None = None) -> str | None:
        return orchestrator.Orchestrator.place(orch, uuid, prefer=prefer)

    assert place("new", prefer="hostb") == "hostb"  # the old backup (or old primary host) answers
    assert place("new") == "hostd"  # fewest standbys of this host's VMs
    orch.links.up = {"hostb", "hostc"}
    assert place("new", prefer="hostd") == "hostc"  # hostd is gone: the lighter of the others
    assert place("u3", prefer="hosta") == "hostc"  # a VM's own standby does not count against a host
    orch.links.up = set()
    assert place("new", prefer="hostb") is None


def test_peer_auto_and_an_element_naming_this_host_leave_the_backup_to_placement() -> None:
    cfg = SimpleNamespace(node_name="hosta", listen=SimpleNamespace(host="198.19.0.11"))
    orch: Any = SimpleNamespace(cfg=cfg)

    def placed(peer: str) -> bool:
        spec = parse_domain(domain_xml("vm", kernel="/k", metadata=[
            f'<cuju:ft xmlns:cuju="https://cuju-ft.github.io/libvirt/ft/1.0" peer="{peer}"/>']))
        assert spec is not None
        return bool(orchestrator.Orchestrator.names_this_host(orch, spec))

    assert placed("auto") and placed("hosta") and placed("198.19.0.11:7790")
    assert not placed("hostb") and not placed("198.19.0.12")


def test_an_element_without_peer_needs_the_cluster_and_says_so() -> None:
    """Issue 9: ``peer`` may be left out (the cluster places the standby); without etcd
    nothing may place it, and no peer is guessed."""
    spec = parse_domain(domain_xml("vm", kernel="/k", metadata=[
        '<cuju:ft xmlns:cuju="https://cuju-ft.github.io/libvirt/ft/1.0"/>']))
    assert spec is not None and spec.placed
    cfg = SimpleNamespace(node_name="hosta", listen=SimpleNamespace(host="198.19.0.11"))
    orch: Any = SimpleNamespace(cfg=cfg, witness=None, links=FakeLinks(["hostb"], {"hostb"}),
                                primaries={}, _lock=threading.Lock())
    orch.names_this_host = lambda s: orchestrator.Orchestrator.names_this_host(orch, s)
    orch.place = lambda uuid, prefer=None: orchestrator.Orchestrator.place(orch, uuid, prefer=prefer)
    orch.connected_peers = lambda: orchestrator.Orchestrator.connected_peers(orch)
    with pytest.raises(CujuError, match=r"no peer attribute.*etcd_endpoints.*fix: add peer="):
        orchestrator.Orchestrator.resolve_peer(orch, spec)
    orch.witness = object()  # with the witness, the standby is placed
    assert orchestrator.Orchestrator.resolve_peer(orch, spec) == "hostb"


def settle(sb: Standby, monkeypatch: pytest.MonkeyPatch, *, within: float = 5.0) -> threading.Thread:
    """Run ``settle_after_restart`` as the restarted cujud does (asking again every 10 ms)."""
    monkeypatch.setattr(standby_mod, "SETTLE_RETRY", 0.01)
    sb.recovering = True
    t = threading.Thread(target=sb.settle_after_restart, daemon=True)
    t.start()
    t.join(within)
    return t


def test_a_standby_left_by_a_dead_cujud_takes_over_when_the_primary_ceded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bug that lost the VM: the restarted backup cujud destroyed this standby as an orphan."""
    sb, events = make_standby(tmp_path, peer_says=["ceded"])
    sb.save_record()
    assert not settle(sb, monkeypatch).is_alive()
    assert sb.taken_over and not sb.recovering
    assert events == ["vm-state", "define", "taken_over"]
    assert records.read(tmp_path, records.TAKEOVERS, sb.uuid) is not None
    assert records.read(tmp_path, records.STANDBYS, sb.uuid) is None


def test_a_standby_left_by_a_dead_cujud_is_dropped_while_the_primary_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb, events = make_standby(tmp_path, peer_says=["runs"])
    sb.save_record()
    assert not settle(sb, monkeypatch).is_alive()
    _join_drops()
    assert sb.abandoned and not sb.taken_over and "destroy" in events
    assert sb.engine is not None and sb.engine.failovers == 0  # type: ignore[attr-defined]
    assert records.read(tmp_path, records.STANDBYS, sb.uuid) is None


def test_without_an_answer_nor_a_witness_the_left_standby_stays_paused_then_follows_the_word(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never a guess: no answer keeps it paused (and claimed by nobody); the QEMU that died
    while its cujud was classifying ('deciding') is followed once the primary's host ceded."""
    sb, events = make_standby(tmp_path, peer_says=[None] * 20 + ["deciding"] * 5 + ["ceded"])
    assert not settle(sb, monkeypatch).is_alive()
    assert sb.taken_over
    assert events.count("vm-state") == 26 and events[-2:] == ["define", "taken_over"]


def test_a_left_standby_follows_the_primarys_crash_note_and_a_stop_drops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb, events = make_standby(tmp_path, peer_says=[None])
    sb.peer_word = "ceded"  # primary-crashed arrived while it was being reopened
    assert not settle(sb, monkeypatch).is_alive() and sb.taken_over and "vm-state" not in events
    stopped, events2 = make_standby(tmp_path / "b", peer_says=["stopped"])
    records.write(tmp_path / "b", records.CEDED, stopped.uuid, peer="hosta", reason="a standby here")
    assert not settle(stopped, monkeypatch).is_alive()
    _join_drops()
    assert stopped.abandoned and "destroy" in events2
    assert records.read(tmp_path / "b", records.CEDED, stopped.uuid) is None  # it may start here again


def test_a_left_standby_without_a_consistent_epoch_never_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb, events = make_standby(tmp_path, peer_says=["ceded"])
    sb.engine.holds_epoch = False  # type: ignore[union-attr]
    assert not settle(sb, monkeypatch).is_alive()
    _join_drops()
    assert sb.abandoned and not sb.taken_over and "define" not in events


def test_a_left_standby_with_a_silent_peer_asks_the_witness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ownership record's generation is the fencing token: unknown -> ask again, won -> resume."""
    sb, events = make_standby(tmp_path, verdicts=["unknown", "won"], peer_says=[None])
    sb.timeout_s = 0.05
    assert not settle(sb, monkeypatch).is_alive()
    assert sb.taken_over and events.count("claim") == 2
    lost, events2 = make_standby(tmp_path / "b", verdicts=["lost"], peer_says=[None])
    lost.timeout_s = 0.05
    assert not settle(lost, monkeypatch).is_alive()
    _join_drops()
    assert lost.abandoned and not lost.taken_over and "destroy" in events2


def test_the_standby_record_holds_what_a_restarted_cujud_needs(tmp_path: Path) -> None:
    sb, _events = make_standby(tmp_path, verdicts=["won"])
    sb.disk_sizes = [1 << 20]
    sb.save_record()
    again = Standby.from_record(sb.manager, records.read_all(tmp_path, records.STANDBYS)[0])
    assert again.recovering and not sb.recovering
    for field in ("name", "uuid", "peer", "xml", "persistent_xml", "persistent", "timeout_s", "auto_failover",
                  "generation", "disk_sizes"):
        assert getattr(again, field) == getattr(sb, field), field


def test_vm_state_tells_a_restarted_backup_what_this_host_is_to_the_vm(tmp_path: Path) -> None:
    uuid = "0f1e2d3c-0000-4000-8000-000000000009"

    def lookup(u: str) -> Any:
        raise CujuError("not defined here")

    orch: Any = SimpleNamespace(state_dir=tmp_path, _lock=threading.Lock(), primaries={}, lookup=lookup)
    assert orchestrator.Orchestrator.vm_state(orch, uuid) == "stopped"
    records.write(tmp_path, records.PROTECTED, uuid, peer="hostb")
    assert orchestrator.Orchestrator.vm_state(orch, uuid) == "down"
    orch.primaries[uuid] = SimpleNamespace(name="no-such-vm-here", ended=threading.Event())
    assert orchestrator.Orchestrator.vm_state(orch, uuid) == "deciding"  # its QEMU is gone, not classified
    records.write(tmp_path, records.CEDED, uuid, peer="hostb")
    assert orchestrator.Orchestrator.vm_state(orch, uuid) == "ceded"
