"""A throw-away PKI for the rig and the tests: a CA and host certificates, made with ``openssl``.

The files follow the layout of :mod:`cuju_libvirt.cujud.tls` (``ca-cert.pem``,
``host-cert.pem``, ``private/host-key.pem`` per host). Keys are P-256; certificates name
the host by subjectAltName DNS and carry both TLS roles (serverAuth, clientAuth), as a
real cluster's would. :meth:`PKI.host` can also make a certificate that has already
expired (``openssl ca`` with explicit dates), for the tests of refusal.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_KEY_ARGS = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


class PKIUnavailable(RuntimeError):
    """``openssl`` is missing."""


@dataclass(frozen=True)
class HostCredentials:
    ca_file: Path
    cert_file: Path
    key_file: Path


def _run(args: list[str], cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()[-500:]}")


class PKI:
    """A CA in *root*; :meth:`host` issues a host's certificate signed by it."""

    def __init__(self, root: Path, name: str = "cuju-libvirt test CA") -> None:
        if shutil.which("openssl") is None:
            raise PKIUnavailable("openssl is not installed (Debian package openssl)")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca_cert = root / "ca-cert.pem"
        self.ca_key = root / "ca-key.pem"
        _run(["req", "-x509", *_KEY_ARGS, "-keyout", str(self.ca_key), "-out", str(self.ca_cert),
              "-subj", f"/CN={name}", "-days", "30",
              "-addext", "basicConstraints=critical,CA:TRUE",
              "-addext", "keyUsage=critical,keyCertSign,cRLSign"], root)

    def host(self, node: str, *, expired: bool = False, names: tuple[str, ...] | None = None,
             ips: tuple[str, ...] = ()) -> HostCredentials:
        """Credentials for *node* in ``root/node/`` (its SAN lists *names*, default the node,
        and the addresses *ips*)."""
        d = self.root / (node + ("-expired" if expired else ""))
        (d / "private").mkdir(parents=True, exist_ok=True)
        key, csr = d / "private" / "host-key.pem", d / "host.csr"
        cert, ext = d / "host-cert.pem", d / "ext.cnf"
        dns = [f"DNS:{n}" for n in (names if names is not None else (node,))]
        san = ",".join(dns + [f"IP:{i}" for i in ips])
        ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n"
                       "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n")
        _run(["req", *_KEY_ARGS, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={node}"], d)
        key.chmod(0o600)
        if not expired:
            _run(["x509", "-req", "-in", str(csr), "-CA", str(self.ca_cert), "-CAkey", str(self.ca_key),
                  "-CAcreateserial", "-out", str(cert), "-days", "30", "-extfile", str(ext)], d)
        else:
            (d / "index.txt").write_text("")
            (d / "serial").write_text("1000\n")
            (d / "ca.cnf").write_text(
                "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n"
                "default_md = sha256\npolicy = p\nunique_subject = no\n[p]\ncommonName = supplied\n")
            _run(["ca", "-batch", "-notext", "-config", "ca.cnf", "-cert", str(self.ca_cert),
                  "-keyfile", str(self.ca_key), "-in", str(csr), "-out", str(cert),
                  "-startdate", "20200101000000Z", "-enddate", "20200102000000Z", "-extfile", str(ext)], d)
        return HostCredentials(self.ca_cert, cert, key)
