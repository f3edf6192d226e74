"""Certificates and keys for the local control plane.

One self-signed CA signs the apiserver's serving certificate and the client
certificates of the admin user and the control plane components. EC P-256 keys
keep generation instant.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .layout import COREDNS_USER, NODE_IP, NODE_NAME

VALIDITY = datetime.timedelta(days=365)
FRONT_PROXY_CLIENT = "front-proxy-client"
APISERVER_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ClusterPKI:
    ca: CertPair
    apiserver: CertPair
    admin: CertPair
    controller_manager: CertPair
    scheduler: CertPair
    front_proxy_client: CertPair
    kubelet_client: CertPair
    """The node's identity towards the apiserver (group system:nodes)."""
    kubelet_serving: CertPair
    apiserver_kubelet_client: CertPair
    """The apiserver's identity towards the kubelet, for logs, exec and port-forward."""
    kube_proxy: CertPair
    coredns: CertPair
    service_account_key: Path
    service_account_pub: Path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
    )


def _key_usage(signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, key_encipherment=False, content_commitment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=signs_certificates, crl_sign=signs_certificates,
        encipher_only=False, decipher_only=False,
    )


def _save(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, directory: Path, stem: str) -> CertPair:
    pair = CertPair(directory / f"{stem}.crt", directory / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, pair.key)
    return pair


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    directory: Path,
    stem: str,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName] | None = None,
) -> CertPair:
    key = _new_key()
    builder = (
        _builder(subject, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return _save(builder.sign(ca_key, hashes.SHA256()), key, directory, stem)


def create_pki(directory: Path) -> ClusterPKI:
    """Writes a fresh CA, component certificates and the service-account key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _new_key()
    ca_subject = _name("kubelm-devcluster-ca")
    ca_cert = (
        _builder(ca_subject, ca_subject, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca = _save(ca_cert, ca_key, directory, "ca")
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in APISERVER_DNS_NAMES]
    # 10.0.0.1 is the ClusterIP of the kubernetes Service in --service-cluster-ip-range.
    # NODE_IP: pods on a real node reach the apiserver through the bridge address.
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "10.0.0.1", NODE_IP)]
    server = ExtendedKeyUsageOID.SERVER_AUTH
    client = ExtendedKeyUsageOID.CLIENT_AUTH

    def leaf(stem: str, subject: x509.Name, usage: x509.ObjectIdentifier,
             alt: list[x509.GeneralName] | None = None) -> CertPair:
        return _leaf(ca_cert, ca_key, directory, stem, subject, usage, alt)

    sa_key = _new_key()
    sa_key_path = directory / "service-account.key"
    _write_key(sa_key, sa_key_path)
    sa_pub_path = directory / "service-account.pub"
    sa_pub_path.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return ClusterPKI(
        ca=ca,
        apiserver=leaf("apiserver", _name("kube-apiserver"), server, sans),
        admin=leaf("admin", _name("kubelm-admin", "system:masters"), client),
        controller_manager=leaf("controller-manager", _name("system:kube-controller-manager"), client),
        scheduler=leaf("scheduler", _name("system:kube-scheduler"), client),
        front_proxy_client=leaf("front-proxy-client", _name(FRONT_PROXY_CLIENT), client),
        kubelet_client=leaf("kubelet-client", _name(f"system:node:{NODE_NAME}", "system:nodes"), client),
        kubelet_serving=leaf("kubelet-serving", _name(f"system:node:{NODE_NAME}", "system:nodes"), server,
                             [x509.DNSName(NODE_NAME), x509.IPAddress(ipaddress.ip_address(NODE_IP))]),
        apiserver_kubelet_client=leaf("apiserver-kubelet-client", _name("kube-apiserver-kubelet-client",
                                                                        "system:masters"), client),
        kube_proxy=leaf("kube-proxy", _name("system:kube-proxy"), client),
        coredns=leaf("coredns", _name(COREDNS_USER), client),
        service_account_key=sa_key_path,
        service_account_pub=sa_pub_path,
    )
