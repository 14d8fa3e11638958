"""Certificates and node keys from `deploy.certs` / `fedliver certs`: chain, SANs, modes, refusal,
OpenSSH keys accepted by Flower's own loaders, and a real TLS handshake on loopback."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store

from deploy.certs import CertConfig, CertError, CertLayout, OverwriteError, generate_federation_certs
from fedliver.cli import main

SANS = ("fl.hospital-net.example", "10.20.30.40", "fd00::7")
SITES = ("A", "B1", "B2", "C")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> CertLayout:
    out = tmp_path_factory.mktemp("certs") / "out"
    return generate_federation_certs(out, CertConfig(sans=SANS, sites=SITES, days=30))


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_layout_files_exist(layout: CertLayout) -> None:
    for path in layout.files(SITES):
        assert path.is_file(), path
    assert layout.sites() == sorted(SITES)
    assert layout.site_key("B1").name == "b1.key"
    readme = layout.readme.read_text()
    for path in (layout.ca_key, layout.server_key, layout.site_key("B2")):
        assert path.relative_to(layout.root).as_posix() in readme
    assert "SECRET" in readme


def test_readme_lists_every_secret_file_only_as_secret(layout: CertLayout) -> None:
    readme = layout.readme.read_text()
    secret_part, public_part = readme.split("PUBLIC files", 1)
    secrets = [layout.ca_key, layout.server_key, *(layout.site_key(s) for s in SITES)]
    for path in secrets:
        rel = path.relative_to(layout.root).as_posix()
        assert rel in secret_part, rel
        assert rel not in public_part and path.name not in public_part.replace("SECRET server.key", ""), rel
    for path in (layout.ca_cert, layout.server_cert, layout.server_ca, layout.site_pub("A")):
        assert path.relative_to(layout.root).as_posix() in public_part


def test_ca_is_a_ca(layout: CertLayout) -> None:
    ca = _cert(layout.ca_cert)
    assert ca.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp384r1"
    # every copy handed out is the same CA certificate
    for copy in (layout.server_ca, *(layout.site_ca(s) for s in SITES)):
        assert copy.read_bytes() == layout.ca_cert.read_bytes()


def test_server_chain_verifies_for_every_name(layout: CertLayout) -> None:
    ca, server = _cert(layout.ca_cert), _cert(layout.server_cert)
    ca.public_key().verify(
        server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm)
    )
    store = Store([ca])
    for name in ("fl.hospital-net.example", "localhost"):
        verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName(name))
        assert verifier.verify(server, [])[-1] == ca
    for ip in ("10.20.30.40", "127.0.0.1", "fd00::7"):
        verifier = PolicyBuilder().store(store).build_server_verifier(
            x509.IPAddress(ipaddress.ip_address(ip)))
        assert verifier.verify(server, [])[-1] == ca
    wrong = PolicyBuilder().store(store).build_server_verifier(x509.DNSName("other.example"))
    with pytest.raises(Exception):
        wrong.verify(server, [])


def test_server_extensions(layout: CertLayout) -> None:
    server = _cert(layout.server_cert)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.hospital-net.example", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.20.30.40"), ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("fd00::7")}
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30)
    key = serialization.load_pem_private_key(layout.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_secret_files_are_0600(layout: CertLayout) -> None:
    secrets = [layout.ca_key, layout.server_key, *(layout.site_key(s) for s in SITES)]
    for path in secrets:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (layout.ca_cert, layout.server_cert, layout.site_pub("A"), layout.readme):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_site_keys_are_openssh_pairs_flower_accepts(layout: CertLayout) -> None:
    from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` runs
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    seen = set()
    for site in SITES:
        private_text = layout.site_key(site).read_bytes()
        public_text = layout.site_pub(site).read_text()
        assert private_text.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        assert public_text.startswith("ecdsa-sha2-nistp384 ")
        private = serialization.load_ssh_private_key(private_text, None)  # as flower-supernode does
        public = serialization.load_ssh_public_key(public_text.encode())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
        assert try_load_public_key(layout.site_pub(site)) == public_key_to_bytes(public)
        seen.add(public_text.split()[1])
    assert len(seen) == len(SITES)  # one distinct key per site


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "c"
    layout = generate_federation_certs(out, CertConfig(sites=("A",)))
    before = layout.ca_cert.read_bytes()
    with pytest.raises(OverwriteError, match="exists already"):
        generate_federation_certs(out, CertConfig(sites=("A",)))
    assert layout.ca_cert.read_bytes() == before
    layout.site_key("A").chmod(0o644)
    generate_federation_certs(out, CertConfig(sites=("A",), force=True))
    assert layout.ca_cert.read_bytes() != before
    assert stat.S_IMODE(layout.site_key("A").stat().st_mode) == 0o600


@pytest.mark.parametrize("config, message", [
    (CertConfig(sans=("https://fl.example:8000",)), "without scheme or port"),
    (CertConfig(sites=("A/B",)), "site 'A/B'"),
    (CertConfig(sites=("b1", "B1")), "differ only by case"),
    (CertConfig(days=0), "at least 1 day"),
])
def test_bad_input_writes_nothing(tmp_path: Path, config: CertConfig, message: str) -> None:
    with pytest.raises(CertError, match=message):
        generate_federation_certs(tmp_path / "c", config)
    assert not (tmp_path / "c").exists()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    argv = ["certs", str(out), "--san", "fl.example,192.168.1.9", "--san", "coord",
            "--sites", "A,B1", "--days", "10"]
    assert main(argv) == 0
    san = _cert(out / "superlink" / "server.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert {"fl.example", "coord", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert (out / "sites" / "B1" / "b1.pub").is_file()
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err and str(out) in err
    assert main([*argv, "--force"]) == 0


def test_tls_handshake_with_python_ssl(layout: CertLayout) -> None:
    """The server certificate + key serve TLS that a client trusting only ca.crt accepts."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(layout.server_cert, layout.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            conn, _addr = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except ssl.SSLError:
                pass  # the client refused us: expected once below

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(layout.site_ca("A")))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.recv(2) == b"ok"
        # A client with only the system trust store must refuse this server.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
    finally:
        thread.join(timeout=10)
        listener.close()


def test_warns_when_keys_land_in_the_flower_app(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text('[tool.flwr.app]\npublisher = "x"\n')
    assert main(["certs", str(app / "certs"), "--sites", "A"]) == 0
    assert "inside the Flower app folder" in capsys.readouterr().err
    assert main(["certs", str(tmp_path / "elsewhere"), "--sites", "A"]) == 0
    assert "inside the Flower app folder" not in capsys.readouterr().err


def test_add_sites_keeps_the_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c"
    assert main(["certs", str(out), "--sites", "A"]) == 0
    layout = CertLayout(out.resolve())
    ca, server, key_a = (layout.ca_cert.read_bytes(), layout.server_cert.read_bytes(),
                         layout.site_key("A").read_bytes())
    assert main(["certs", str(out), "--sites", "D", "--add-sites"]) == 0
    assert layout.ca_cert.read_bytes() == ca and layout.server_cert.read_bytes() == server
    assert layout.site_key("A").read_bytes() == key_a
    assert layout.site_ca("D").read_bytes() == ca
    assert stat.S_IMODE(layout.site_key("D").stat().st_mode) == 0o600
    serialization.load_ssh_private_key(layout.site_key("D").read_bytes(), None)
    capsys.readouterr()
    assert main(["certs", str(out), "--sites", "A", "--add-sites"]) == 1
    assert "site exists already" in capsys.readouterr().err
    assert layout.site_key("A").read_bytes() == key_a
    assert main(["certs", str(tmp_path / "none"), "--sites", "X", "--add-sites"]) == 1
