"""Certificates for the TLS tests, made at test time with ``trustme``: a bus CA whose
node certificates name 127.0.0.1 (and ``node-N``), a second CA nobody trusts, and one
expired certificate from the bus CA."""

from __future__ import annotations

import datetime
import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from harness.gateway import TlsFiles

_serial = itertools.count(1)


@dataclass
class Pki:
    """A CA and the files of the identities it issues, in one directory."""

    ca: trustme.CA
    directory: Path
    name: str

    @property
    def ca_path(self) -> str:
        path = self.directory / f"{self.name}-ca.pem"
        if not path.exists():
            self.ca.cert_pem.write_to_path(str(path))
        return str(path)

    def issue(
        self,
        *names: str,
        not_after: datetime.datetime | None = None,
        not_before: datetime.datetime | None = None,
    ) -> TlsFiles:
        """A certificate for ``names`` (default 127.0.0.1 and a node name) and its key."""
        number = next(_serial)
        identities = names or ("127.0.0.1", f"node-{number}")
        kwargs = {}
        if not_after is not None:
            kwargs["not_after"] = not_after
        if not_before is not None:
            kwargs["not_before"] = not_before
        leaf = self.ca.issue_cert(*identities, **kwargs)
        cert = self.directory / f"{self.name}-{number}-cert.pem"
        key = self.directory / f"{self.name}-{number}-key.pem"
        for blob in leaf.cert_chain_pems:
            blob.write_to_path(str(cert), append=True)
        leaf.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)
        return TlsFiles(str(cert), str(key), self.ca_path)

    def combined(self, files: TlsFiles) -> str:
        """One PEM file with a certificate and its key (what ``--cert`` takes)."""
        path = Path(files.cert).with_suffix(".both.pem")
        path.write_text(Path(files.cert).read_text() + Path(files.key).read_text())
        return str(path)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(trustme.CA(), tmp_path_factory.mktemp("pki"), "bus")


@pytest.fixture(scope="session")
def rogue_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(trustme.CA(), tmp_path_factory.mktemp("rogue"), "rogue")


def expired(pki: Pki) -> TlsFiles:
    now = datetime.datetime.now(datetime.UTC)
    return pki.issue(
        "127.0.0.1",
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
