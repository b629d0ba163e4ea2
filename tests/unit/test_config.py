"""cujud configuration: table, files, drop-ins, errors naming file/key/fix, PSK file checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cuju_libvirt import config
from cuju_libvirt.cli import main
from cuju_libvirt.config import PEER_PORT, Address, parse_address
from cuju_libvirt.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    (tmp_path / "cujud.d").mkdir()
    return tmp_path


def load(etc: Path) -> config.Config:
    return config.load(etc / "cujud.yaml", etc / "cujud.d")


def test_defaults_without_files(etc: Path) -> None:
    c = load(etc)
    assert c.files == ()
    assert set(c.sources.values()) == {"default"}
    assert c.listen == Address("0.0.0.0", 7790)
    assert c.ft_listen.port == 7791
    assert c.metrics_listen.port not in (9177, 9100, 9090)
    assert c.libvirt_uri == "qemu:///system"
    assert c.control_socket == Path("/run/cuju-libvirt/cujud.sock")
    assert c.run_dir == Path("/run/cuju-libvirt")
    assert c.state_dir == Path("/var/lib/cuju-libvirt")
    assert c.peers == {}
    assert c.log_level == "INFO"


def test_main_file_then_sorted_dropins_later_wins(etc: Path) -> None:
    (etc / "cujud.yaml").write_text("node_name: a\nlog_level: debug\npeers: {b: 10.0.0.2}\n")
    (etc / "cujud.d" / "20-late.yaml").write_text("heartbeat_interval: 0.25\nlog_level: ERROR\n")
    (etc / "cujud.d" / "10-early.yaml").write_text("log_level: warning\npeer_timeout: 2\n")
    (etc / "cujud.d" / "30-ignored.yml.bak").write_text("bogus: 1\n")
    c = load(etc)
    assert c.node_name == "a"
    assert c.log_level == "ERROR"
    assert c.sources["log_level"] == str(etc / "cujud.d" / "20-late.yaml")
    assert c.peer_timeout == 2.0
    assert c.sources["peer_timeout"] == str(etc / "cujud.d" / "10-early.yaml")
    assert c.peers == {"b": Address("10.0.0.2", PEER_PORT)}
    assert c.sources["listen"] == "default"
    d = etc / "cujud.d"
    assert c.files == (etc / "cujud.yaml", d / "10-early.yaml", d / "20-late.yaml")


def test_dropin_replaces_the_whole_peers_value(etc: Path) -> None:
    (etc / "cujud.yaml").write_text("node_name: a\npeers: {b: 10.0.0.2, c: 10.0.0.3}\n")
    (etc / "cujud.d" / "x.yaml").write_text("peers: {d: '[fd00::4]:7000'}\n")
    assert load(etc).peers == {"d": Address("fd00::4", 7000)}


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("lisen: 1.2.3.4\n", ["unknown key 'lisen'", "did you mean 'listen'"]),
        ("frobnicate: 1\n", ["unknown key 'frobnicate'", "known keys are node_name"]),
        ("heartbeat_interval: fast\n", ["heartbeat_interval", "expected a number", "a string"]),
        ("heartbeat_interval: 0\n", ["heartbeat_interval", "out of range", "0.01 to 60"]),
        ("heartbeat_interval: true\n", ["heartbeat_interval", "expected a number", "boolean"]),
        ("log_level: LOUD\n", ["log_level", "not one of DEBUG, INFO, WARNING, ERROR"]),
        ("listen: 1.2.3.4:99999\n", ["listen", "port must be a number from 1 to 65535"]),
        ("listen: fd00::1\n", ["listen", "brackets", "[fd00::1]:7790"]),
        ("listen: 7790\n", ["listen", "expected 'HOST:PORT' as a string", "an integer"]),
        ("peers: [a, b]\n", ["peers", "expected a mapping", "a list"]),
        ("peers: {'bad name': x}\n", ["peers", "not a node name"]),
        ("peers: {b: 12}\n", ["peer 'b'", "as a string"]),
        ("psk_file: relative/psk\n", ["psk_file", "absolute path"]),
        ("node_name: ''\n", ["node_name", "not a node name"]),
        ("- a\n- b\n", ["expected a mapping of 'key: value' lines"]),
        ("listen: [\n", ["not valid YAML", "line"]),
        ("log_level: INFO\nlog_level: DEBUG\n", ["duplicate key 'log_level'"]),
        ("psk_file: !!python/object/apply:os.system ['true']\n", ["not valid YAML"]),
        ("heartbeat_interval: 2\npeer_timeout: 1\n", ["peer_timeout (1 s) must exceed heartbeat_interval"]),
        ("reconnect_min: 10\nreconnect_max: 5\n", ["reconnect_min (10 s) exceeds reconnect_max"]),
        ("node_name: a\npeers: {a: 1.2.3.4}\n", ["own node_name 'a'"]),
        ("listen: 0.0.0.0:7791\n", ["ft_listen", "would listen on the same port"]),
        ("metrics_listen: 127.0.0.1:7790\n", ["listen (0.0.0.0:7790, from default) and metrics_listen"]),
        ("etcd_endpoints: [https://e1:2379]\n", ["etcd_endpoints", "TLS is not supported yet"]),
        ("etcd_endpoints: {a: b}\n", ["etcd_endpoints", "expected a list"]),
        ("etcd_endpoints: [http://e1:99999]\n", ["etcd_endpoints", "port must be a number"]),
        ("failure_domain: 'rack 1'\n", ["failure_domain", "not a failure-domain label", "A-Z a-z 0-9 . _ -"]),
        ("failure_domain: 3\n", ["failure_domain", "an integer", "not a failure-domain label"]),
        ("host_lease_ttl: 1\n", ["host_lease_ttl", "out of range", "2 to 300 s"]),
    ],
)
def test_errors_name_file_key_and_fix(etc: Path, text: str, needles: list[str]) -> None:
    (etc / "cujud.d" / "50-bad.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load(etc)
    message = str(info.value)
    assert str(etc / "cujud.d" / "50-bad.yaml") in message
    for needle in needles:
        assert needle in message


def test_unreadable_binary_and_huge_files(etc: Path) -> None:
    bad = etc / "cujud.yaml"
    bad.write_bytes(b"node_name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(etc)
    bad.write_bytes(b"#" * (config.MAX_FILE_BYTES + 10))
    with pytest.raises(ConfigError, match="larger than"):
        load(etc)
    bad.unlink()
    bad.mkdir()
    with pytest.raises(ConfigError, match="cannot read"):
        load(etc)


def test_empty_file_is_all_defaults(etc: Path) -> None:
    (etc / "cujud.yaml").write_text("# nothing yet\n")
    c = load(etc)
    assert c.files == (etc / "cujud.yaml",)
    assert set(c.sources.values()) == {"default"}


def test_render_names_sources_and_round_trips(etc: Path) -> None:
    (etc / "cujud.yaml").write_text("node_name: a\npeers: {b: '[fd00::2]'}\nheartbeat_interval: 0.2\n")
    c = load(etc)
    text = config.render(c)
    assert f"node_name: a  # {etc / 'cujud.yaml'}" in text
    assert "libvirt_uri: 'qemu:///system'  # default" in text
    # what --print-config prints is itself a valid config giving the same values
    (etc / "cujud.yaml").write_text(text)
    again = load(etc)
    assert again.as_dict() == c.as_dict()


def test_sample_config_loads_and_sets_only_known_keys() -> None:
    sample = ROOT / "packaging" / "etc" / "cuju-libvirt" / "cujud.yaml"
    c = config.load(sample, ROOT / "nonexistent.d")
    assert c.files == (sample,)
    assert c.peers  # the sample shows a peer entry
    documented = set(yaml.safe_load(sample.read_text()))
    assert documented <= set(config.SETTINGS_BY_KEY)


def test_docs_table_matches_the_declarative_table() -> None:
    doc = (ROOT / "docs" / "cujud.md").read_text()
    assert config.markdown_table() in doc


# --- addresses ---

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host", Address("host", 7790)),
        ("10.0.0.1:1", Address("10.0.0.1", 1)),
        ("[::1]", Address("::1", 7790)),
        ("[fd00::1]:65535", Address("fd00::1", 65535)),
    ],
)
def test_parse_address(text: str, expected: Address) -> None:
    assert parse_address(text, 7790) == expected


@given(st.text(max_size=40))
@example("hostb:\u00b9")  # found by Hypothesis: a superscript digit passes str.isdigit() but not int()
@settings(max_examples=300, deadline=None)
def test_parse_address_never_crashes_and_round_trips(text: str) -> None:
    try:
        addr = parse_address(text, 7790)
    except config._Invalid:
        return
    assert 1 <= addr.port <= 65535
    assert parse_address(str(addr), 1) == addr


@pytest.mark.parametrize("port", ["\u00b9", "\u0667\u0667", "\uff18\uff10"])
def test_a_port_of_non_ascii_digits_is_refused_with_the_rule(port: str) -> None:
    # superscript, Arabic-Indic and full-width digits all pass str.isdigit(); int() crashes on
    # the first and reads the others, but no operator means them as a port
    with pytest.raises(config._Invalid, match="port must be a number from 1 to 65535"):
        parse_address(f"hostb:{port}", 7790)


@given(st.dictionaries(st.text(max_size=20), st.one_of(st.none(), st.booleans(), st.integers(),
                                                        st.floats(), st.text(max_size=20)), max_size=5))
@settings(max_examples=200, deadline=None)
def test_arbitrary_documents_give_config_or_config_error(tmp_path_factory: pytest.TempPathFactory,
                                                         doc: dict[str, object]) -> None:
    d = tmp_path_factory.mktemp("daemon-cfg")
    (d / "cujud.yaml").write_text(yaml.safe_dump(doc))
    try:
        c = config.load(d / "cujud.yaml", d / "none")
    except ConfigError as err:
        assert str(d / "cujud.yaml") in str(err)
    else:
        assert set(c.sources) == set(config.SETTINGS_BY_KEY)


# --- the pre-shared key ---

def write_psk(path: Path, data: bytes, mode: int) -> Path:
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def test_psk_good(tmp_path: Path) -> None:
    key = b"k" * 44
    assert config.read_psk(write_psk(tmp_path / "psk", key + b"\n", 0o600)) == key
    assert config.read_psk(write_psk(tmp_path / "psk4", key, 0o400)) == key


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_psk_readable_by_others_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = write_psk(tmp_path / "psk", b"k" * 44, mode)
    with pytest.raises(ConfigError, match=f"mode {mode:04o}.*chmod 600 {path}"):
        config.read_psk(path)


def test_psk_missing_short_symlink(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; create it"):
        config.read_psk(tmp_path / "nope")
    short = write_psk(tmp_path / "short", b"abc\n", 0o600)
    with pytest.raises(ConfigError, match="holds 3 bytes; use at least 32"):
        config.read_psk(short)
    link = tmp_path / "link"
    link.symlink_to(write_psk(tmp_path / "real", b"k" * 44, 0o600))
    with pytest.raises(ConfigError, match="cannot open"):
        config.read_psk(link)


# --- cuju-libvirt config show ---

def test_cli_config_show(etc: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (etc / "cujud.yaml").write_text("node_name: a\n")
    (etc / "cujud.d" / "10-x.yaml").write_text("log_level: debug\n")
    assert main(["config", "show", "--config", str(etc / "cujud.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"log_level: DEBUG  # {etc / 'cujud.d' / '10-x.yaml'}" in out  # drop-ins next to the file
    assert main(["config", "show", "--config", str(etc / "cujud.yaml"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["values"]["node_name"] == "a" and data["sources"]["listen"] == "default"

    (etc / "cujud.d" / "20-bad.yaml").write_text("peer_timeout: -1\n")
    assert main(["config", "show", "--config", str(etc / "cujud.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "20-bad.yaml: peer_timeout: -1 is out of range" in err
    assert main(["config", "show", "--config", str(etc / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err


def test_etcd_endpoints_parse_to_urls(etc: Path) -> None:
    (etc / "cujud.yaml").write_text("etcd_endpoints: [http://10.0.0.1:2379/, 'http://e2:2379']\n")
    c = load(etc)
    assert c.etcd_endpoints == ("http://10.0.0.1:2379", "http://e2:2379")
    (etc / "cujud.yaml").write_text("etcd_endpoints: http://e3:2379\n")
    assert load(etc).etcd_endpoints == ("http://e3:2379",)
    (etc / "cujud.yaml").write_text("# none\n")
    assert load(etc).etcd_endpoints == ()


def test_the_failure_domain_defaults_to_the_node_name(etc: Path) -> None:
    (etc / "cujud.yaml").write_text("node_name: a\n")
    assert load(etc).failure_domain == "a"
    (etc / "cujud.yaml").write_text("node_name: a\nfailure_domain: rack-2.east\n")
    assert load(etc).failure_domain == "rack-2.east"
