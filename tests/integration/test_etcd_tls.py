"""TLS towards etcd (cuju_libvirt.cujud.coord.tls_context, ``https://`` endpoints): a real
etcd member that serves its clients over TLS and asks for a client certificate
(``--client-cert-auth``), certificates from a throw-away CA made with openssl. cujud's
client, built from cujud.yaml as the daemon builds it, reads and writes ownership records;
without a client certificate, or trusting another CA, no call goes through and the error
says why."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cuju_libvirt import config
from cuju_libvirt.cujud.coord import EtcdClient, OwnershipStore, tls_context
from cuju_libvirt.errors import CoordError, CoordUnavailable
from cuju_libvirt.rig.etcd import EtcdCluster, EtcdTLS, etcd_binary
from cuju_libvirt.rig.pki import PKI, HostCredentials, PKIUnavailable

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed (Debian etcd-server)"),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    try:
        return PKI(tmp_path_factory.mktemp("etcd-pki"))
    except PKIUnavailable as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def client_creds(pki: PKI) -> HostCredentials:
    return pki.host("cuju-a")


@pytest.fixture(scope="module")
def etcd(pki: PKI, client_creds: HostCredentials) -> Iterator[EtcdCluster]:
    server = pki.host("etcd", names=("localhost",), ips=("127.0.0.1",))
    with EtcdCluster.loopback(1, tls=EtcdTLS(server=server, client=client_creds)) as cluster:
        yield cluster


def test_cujud_reaches_etcd_over_tls_with_its_client_certificate(
    etcd: EtcdCluster, client_creds: HostCredentials, tmp_path: Path
) -> None:
    assert all(url.startswith("https://127.0.0.1:") for url in etcd.endpoints)
    (tmp_path / "cujud.yaml").write_text(
        f"etcd_endpoints: [{etcd.endpoints[0]}]\n"
        f"etcd_ca_file: {client_creds.ca_file}\netcd_cert_file: {client_creds.cert_file}\n"
        f"etcd_key_file: {client_creds.key_file}\n")
    cfg = config.load(tmp_path / "cujud.yaml", tmp_path / "cujud.d")
    client = EtcdClient.for_config(cfg)
    assert client.tls is not None
    store = OwnershipStore(client, prefix="/tls-test")
    rec = store.protect("u1", "web", "a", "b")
    assert (rec.owner, rec.backup, rec.generation) == ("a", "b", 1)
    read = store.read("u1")
    assert read is not None and read.record == rec
    lease = client.lease_grant(5)
    assert client.lease_keepalive(lease) > 0


def test_without_a_client_certificate_or_with_another_ca_nothing_goes_through(
    etcd: EtcdCluster, pki: PKI, client_creds: HostCredentials, tmp_path: Path
) -> None:
    url = etcd.endpoints[0]
    anonymous = EtcdClient([url], timeout=1.0, tls=tls_context(client_creds.ca_file))
    member = etcd.members[0]
    assert member.log_path is not None
    said = member.log_path.stat().st_size
    with pytest.raises(CoordUnavailable, match=r"127\.0\.0\.1:\d+: "):
        anonymous.get("/tls-test/x")
    # With TLS 1.3 the server checks the client's certificate after the client finished its
    # handshake: the client reads etcd's alert or just the closed connection, as it happens.
    # etcd's log says which, every time.
    rejected = member.log_path.read_bytes()[said:].decode(errors="replace")
    assert "rejected connection" in rejected and "client didn't provide a certificate" in rejected
    other = PKI(tmp_path / "other-ca", name="another CA")
    foreign = other.host("cuju-a")
    stranger = EtcdClient([url], timeout=1.0, tls=tls_context(foreign.ca_file, foreign.cert_file,
                                                             foreign.key_file))
    with pytest.raises(CoordUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        stranger.get("/tls-test/x")
    # plain HTTP to the TLS port: etcd hangs up
    with pytest.raises(CoordUnavailable, match="closed connection"):
        EtcdClient([url.replace("https://", "http://")], timeout=1.0).get("/tls-test/x")


def test_unusable_tls_files_are_named(tmp_path: Path, client_creds: HostCredentials) -> None:
    with pytest.raises(CoordError, match=r"etcd_ca_file .*missing\.pem: cannot be used"):
        tls_context(tmp_path / "missing.pem")
    with pytest.raises(CoordError, match="etcd_cert_file/etcd_key_file"):
        tls_context(client_creds.ca_file, client_creds.ca_file, client_creds.key_file)  # key of another cert
