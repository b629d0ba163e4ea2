"""The observer on real loopback sockets, and its command line."""

from __future__ import annotations

import json
import socket

import pytest

from cuju_libvirt.rig.observer import Observer, Rules, counter_stream, encode_datagram, judge_run, main


def test_observer_records_udp_and_tcp_on_loopback() -> None:
    with Observer(("127.0.0.1", 0), ("127.0.0.1", 0)) as obs:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for n in range(5):
                udp.sendto(encode_datagram(n), obs.udp_address)
            udp.sendto(b"not ours", obs.udp_address)
        with socket.create_connection(obs.tcp_address) as tcp:
            tcp.sendall(counter_stream(0, 64))
            rec = obs.wait_for(lambda r: len(r.udp) == 5 and len(r.tcp_data) == 512 and r.udp_foreign, 5.0)
            verdict = judge_run(rec, Rules())
        closed = obs.wait_for(lambda r: r.tcp_closed is not None, 5.0)
    assert [n for n, _ in rec.udp] == [0, 1, 2, 3, 4]
    assert verdict.ok, verdict.problems
    assert verdict.tcp_counters == 64 and rec.udp_foreign == 1
    assert closed.tcp_closed is not None


def test_command_line_judges_a_silent_run_as_failed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--udp", "127.0.0.1:0", "--seconds", "0.2"]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["ok"] is False
    assert verdict["problems"] == ["no UDP datagram from the guest arrived"]


def test_command_line_rejects_a_bad_address(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--udp", "localhost"])
    assert exc.value.code == 2
    assert "is not ADDR:PORT" in capsys.readouterr().err
