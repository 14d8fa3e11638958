"""Certificates and node-authentication keys for a fedliver federation.

One call writes everything a federation needs, with `cryptography` only:

    OUT/ca/ca.crt, ca.key                      the federation's certificate authority
    OUT/superlink/server.crt, server.key, ca.crt   TLS for the coordinator's SuperLink
    OUT/sites/<SITE>/<site>.key, <site>.pub, ca.crt  one node-authentication key pair per hospital
    OUT/README.txt                             which file goes where, which must stay secret

The CA and the server certificate protect the connection (TLS); the sites' ECDSA P-384 key pairs
are Flower's node authentication: the coordinator registers each `<site>.pub` with
`flwr supernode register`, the site starts `flower-supernode --auth-supernode-private-key <site>.key`.
Both Flower commands read OpenSSH encodings, so that is what the site keys use.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Always in the server certificate: the coordinator's own tools (flwr CLI, the ServerApp's
# SuperExec) dial the SuperLink on loopback.
DEFAULT_SANS: tuple[str, ...] = ("localhost", "127.0.0.1")
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
# Certificates start a little in the past so that a site whose clock lags does not reject them.
_CLOCK_SKEW = _dt.timedelta(minutes=5)
_CURVE = ec.SECP384R1


class CertError(ValueError):
    """Bad input for certificate generation; the message is one line for the user."""


class OverwriteError(FileExistsError):
    """A file that generation would write exists already (and `force` was not given)."""


@dataclass(frozen=True)
class CertConfig:
    """What to generate: server names, sites, validity."""

    sans: tuple[str, ...] = ()          # DNS names / IP addresses the sites dial (localhost added)
    sites: tuple[str, ...] = ()         # hospital ids, e.g. ("A", "B1", "B2", "C")
    days: int = 365                     # validity of the CA and the server certificate
    force: bool = False                 # overwrite existing files
    organization: str = "fedliver federation"


@dataclass(frozen=True)
class CertLayout:
    """Where each file lives under the output folder (the contract the launchers read)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def superlink_dir(self) -> Path:
        return self.root / "superlink"

    @property
    def server_cert(self) -> Path:
        return self.superlink_dir / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.superlink_dir / "server.key"

    @property
    def server_ca(self) -> Path:
        return self.superlink_dir / "ca.crt"

    @property
    def readme(self) -> Path:
        return self.root / "README.txt"

    def site_dir(self, site: str) -> Path:
        return self.root / "sites" / site

    def site_key(self, site: str) -> Path:
        return self.site_dir(site) / f"{site.lower()}.key"

    def site_pub(self, site: str) -> Path:
        return self.site_dir(site) / f"{site.lower()}.pub"

    def site_ca(self, site: str) -> Path:
        return self.site_dir(site) / "ca.crt"

    def sites(self) -> list[str]:
        """Sites that have a public key under `sites/` (sorted)."""
        base = self.root / "sites"
        if not base.is_dir():
            return []
        return sorted(d.name for d in base.iterdir() if self.site_pub(d.name).is_file())

    def files(self, sites: Iterable[str]) -> list[Path]:
        out = [self.ca_cert, self.ca_key, self.server_cert, self.server_key, self.server_ca]
        for site in sites:
            out += [self.site_key(site), self.site_pub(site), self.site_ca(site)]
        return out + [self.readme]


def parse_list(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """'A,B1, B2' or ['A,B1', 'B2'] -> ('A', 'B1', 'B2'), duplicates dropped, order kept."""
    if text is None:
        return ()
    parts = [text] if isinstance(text, str) else list(text)
    items = [p.strip() for part in parts for p in part.split(",") if p.strip()]
    return tuple(dict.fromkeys(items))


def validate_site(site: str) -> str:
    if not SITE_NAME_RE.match(site):
        raise CertError(
            f"site {site!r}: use 1-32 letters, digits, '-' or '_' (it names files and folders)"
        )
    return site


def san_entry(name: str) -> x509.GeneralName:
    """An IP address becomes an IPAddress SAN (TLS clients ignore IPs written as DNS names)."""
    name = name.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        pass
    if not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", name):
        raise CertError(
            f"--san {name!r}: give a host name or an IP address, without scheme or port"
        )
    return x509.DNSName(name.lower())


def enclosing_flower_app(path: Path) -> Path | None:
    """The Flower app folder (pyproject.toml with [tool.flwr.app]) that contains `path`, if any:
    `flwr run` bundles that folder and ships it to every site, keys included unless ignored."""
    for folder in Path(path).expanduser().resolve().parents:
        pyproject = folder / "pyproject.toml"
        try:
            if "[tool.flwr.app" in pyproject.read_text(errors="replace"):
                return folder
        except OSError:
            continue
    return None


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(days: int, organization: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Self-signed CA: basicConstraints CA:TRUE (pathlen 0), keyUsage keyCertSign + cRLSign."""
    key = ec.generate_private_key(_CURVE())
    name = _name(f"{organization} CA", organization)
    start = _now() - _CLOCK_SKEW
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    sans: Sequence[str],
    days: int,
    organization: str,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """SuperLink certificate signed by the CA, serverAuth, SANs = `sans` + localhost + 127.0.0.1."""
    names = list(dict.fromkeys([*sans, *DEFAULT_SANS]))
    entries = list(dict.fromkeys(san_entry(n) for n in names))
    key = ec.generate_private_key(_CURVE())
    start = _now() - _CLOCK_SKEW
    # A server certificate must not outlive the CA that vouches for it.
    end = min(start + _dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0], organization))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(entries), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_site_keypair(site: str) -> tuple[bytes, bytes]:
    """ECDSA P-384 key pair: (OpenSSH private key PEM, 'ecdsa-sha2-nistp384 AAAA... fedliver-<site>')."""
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),  # flower-supernode loads the key without a passphrase
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + f" fedliver-{site}\n".encode()


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_file(path: Path, data: bytes, secret: bool) -> None:
    """Write `data`; secrets are created with mode 0600 and never exist with a wider mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if secret else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an existing file (with --force) keeps its old mode otherwise
        os.write(fd, data)
    finally:
        os.close(fd)


def readme_text(layout: CertLayout, sans: Sequence[str], sites: Sequence[str], days: int) -> str:
    rel = lambda p: p.relative_to(layout.root).as_posix()  # noqa: E731
    lines = [
        "fedliver federation certificates and keys",
        "=========================================",
        "",
        f"Server names in the SuperLink certificate: {', '.join(dict.fromkeys([*sans, *DEFAULT_SANS]))}",
        f"Validity: {days} days from generation.",
        "",
        "SECRET files (mode 0600; never e-mail them, never commit them, keep a backup offline):",
        f"  {rel(layout.ca_key):32s} the CA key: keep it offline at the coordinator. Whoever",
        f"  {'':32s} holds it can impersonate the SuperLink to every site.",
        f"  {rel(layout.server_key):32s} SuperLink TLS key. Stays on the coordinator's SuperLink host.",
    ]
    for site in sites:
        lines.append(
            f"  {rel(layout.site_key(site)):32s} site {site}'s node key. Goes to site {site} only."
        )
    lines += [
        "",
        "PUBLIC files (may be shared):",
        f"  {rel(layout.ca_cert):32s} the CA certificate (every party trusts it).",
        f"  {rel(layout.server_cert):32s} the SuperLink's certificate (signed by the CA).",
        f"  {rel(layout.server_ca):32s} copy of the CA certificate, for the SuperLink host.",
        "      The SuperLink host gets the folder superlink/ (with the SECRET server.key above):",
        "      fedliver superlink --certs <this folder> --state <state dir> --host 0.0.0.0",
    ]
    for site in sites:
        lines.append(
            f"  {rel(layout.site_pub(site)):32s} site {site}'s public key: the coordinator registers it"
        )
    lines += [
        "      fedliver register --certs <this folder> --superlink 127.0.0.1:8000 --state <state dir>",
        "",
        "What each hospital receives (copy the folder sites/<SITE>/ over a secure channel):",
        "  <site>.key (secret) and ca.crt, then runs:",
        "      fedliver supernode --site <SITE> --role train --data-dir <its Vendor_X folder> \\",
        "          --superlink <coordinator host>:8000 --ca ca.crt --key <site>.key",
        "  <site>.pub stays with the coordinator (it is also in the folder for reference).",
        "",
        "See docs/deploy.md for the full procedure.",
        "",
    ]
    return "\n".join(lines)


def generate_federation_certs(out: Path, config: CertConfig) -> CertLayout:
    """Write the CA, the SuperLink certificate and one key pair per site under `out`.

    Raises `CertError` on bad names or validity, `OverwriteError` (naming the first existing
    file) when a target exists and `config.force` is false; in that case nothing is written.
    """
    if config.days < 1:
        raise CertError(f"--days {config.days}: validity must be at least 1 day")
    sites = tuple(validate_site(s) for s in config.sites)
    lowered = [s.lower() for s in sites]
    if len(set(lowered)) != len(lowered):
        raise CertError(f"--sites {','.join(sites)}: site names differ only by case")
    for name in config.sans:
        san_entry(name)  # fail before anything is written
    layout = CertLayout(Path(out).expanduser().resolve())
    if not config.force:
        for path in layout.files(sites):
            if path.exists():
                raise OverwriteError(f"{path}: exists already (use --force to overwrite)")

    ca_key, ca_cert = make_ca(config.days, config.organization)
    server_key, server_cert = make_server_cert(
        ca_key, ca_cert, config.sans, config.days, config.organization
    )
    ca_pem = _pem_cert(ca_cert)
    write_file(layout.ca_key, _pem_key(ca_key), secret=True)
    write_file(layout.ca_cert, ca_pem, secret=False)
    write_file(layout.server_key, _pem_key(server_key), secret=True)
    write_file(layout.server_cert, _pem_cert(server_cert), secret=False)
    write_file(layout.server_ca, ca_pem, secret=False)
    for site in sites:
        private, public = make_site_keypair(site)
        write_file(layout.site_key(site), private, secret=True)
        write_file(layout.site_pub(site), public, secret=False)
        write_file(layout.site_ca(site), ca_pem, secret=False)
    # The folders holding secrets should not be listable by others either.
    for folder in [layout.ca_key.parent, layout.superlink_dir, *map(layout.site_dir, sites)]:
        os.chmod(folder, 0o700)
    write_file(layout.readme, readme_text(layout, config.sans, sites, config.days).encode(), False)
    return layout


def add_sites(out: Path, sites: Sequence[str], force: bool = False) -> CertLayout:
    """Key pairs for new sites in an existing output folder, keeping its CA and server
    certificate (node keys do not depend on the CA: sites already running are unaffected)."""
    layout = CertLayout(Path(out).expanduser().resolve())
    if not layout.ca_cert.is_file():
        raise CertError(f"{layout.ca_cert}: not found; create the federation first (without --add-sites)")
    sites = tuple(validate_site(s) for s in sites)
    if not sites:
        raise CertError("--add-sites needs --sites")
    known = {s.lower() for s in layout.sites()}
    for site in sites:
        paths = (layout.site_key(site), layout.site_pub(site), layout.site_ca(site))
        if not force and (site.lower() in known or any(p.exists() for p in paths)):
            raise OverwriteError(f"{layout.site_dir(site)}: site exists already (use --force to replace its key)")
    ca_pem = layout.ca_cert.read_bytes()
    for site in sites:
        private, public = make_site_keypair(site)
        write_file(layout.site_key(site), private, secret=True)
        write_file(layout.site_pub(site), public, secret=False)
        write_file(layout.site_ca(site), ca_pem, secret=False)
        os.chmod(layout.site_dir(site), 0o700)
    return layout
