from __future__ import annotations

import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kubelm_devcluster.pki import create_pki


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certificates_chain_to_the_ca_with_the_right_identities(tmp_path: Path) -> None:
    pki = create_pki(tmp_path)
    ca = _cert(pki.ca.cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    admin = _cert(pki.admin.cert)
    admin.verify_directly_issued_by(ca)
    assert admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:masters"
    assert ExtendedKeyUsageOID.CLIENT_AUTH in admin.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value

    server = _cert(pki.apiserver.cert)
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "kubernetes.default.svc" in sans.get_values_for_type(x509.DNSName)

    for pair, cn in ((pki.controller_manager, "system:kube-controller-manager"),
                     (pki.scheduler, "system:kube-scheduler")):
        cert = _cert(pair.cert)
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cn

    assert oct(pki.service_account_key.stat().st_mode & 0o777) == "0o600"
    assert b"PUBLIC KEY" in pki.service_account_pub.read_bytes()
