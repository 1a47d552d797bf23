"""A throwaway CA and certificates for TLS tests, made with the openssl command."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    ca_key: Path
    dir: Path

    def issue(self, name: str, *, ip: str = "127.0.0.1") -> tuple[Path, Path]:
        """A certificate for ``name`` valid as server (for ``ip``) and as client."""
        key, csr, cert = (self.dir / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
        ext = self.dir / f"{name}.ext"
        ext.write_text(
            f"subjectAltName=IP:{ip},DNS:localhost\n"
            "extendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
        )
        _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                 "-subj", f"/CN={name}")  # fmt: skip
        _openssl("x509", "-req", "-in", csr, "-CA", self.ca_cert, "-CAkey", self.ca_key,
                 "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext)  # fmt: skip
        return cert, key


def make_pki(directory: Path, name: str = "test-ca") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca_cert,
             "-days", "2", "-subj", f"/CN={name}")  # fmt: skip
    return Pki(ca_cert, ca_key, directory)


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)
