"""The node's settings: flags over BLIXARD_* variables over the config file over defaults.

The config file is TOML (default ``/etc/blixard/config.toml``, or ``--config``
/ ``BLIXARD_CONFIG``), with the sections of the design brief::

    [cluster]   node_id, data_dir, log_level
    [api]       host, port
    [store]     backend ("sqlite" | "etcd"), etcd_endpoints, timeout_s, lease_ttl_s
    [microvm]   accel ("auto" | "kvm" | "tcg"), vcpu_overcommit, kvm_probe_timeout_s,
                build_default_image, stop_timeout_s

A key Blixard does not know in one of these sections is an error (a typo must
not be ignored silently); other sections of the brief (``[discovery]``,
``[network]``, ...) belong to features not built yet and are reported as
unused, not refused.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from blixard.client.config import default_data_dir
from blixard.domain.errors import ValidationError
from blixard.domain.fields import Name
from blixard.domain.meta import SpecModel
from blixard.domain.parse import parse
from blixard.domain.vm import Accel

DEFAULT_CONFIG = Path("/etc/blixard/config.toml")
CONFIG_ENV = "BLIXARD_CONFIG"
DEFAULT_API_PORT = 7400


def default_node_id() -> str:
    """The host name, lowered and cut to a DNS label."""
    name = socket.gethostname().split(".")[0].lower()
    cleaned = "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")[:63]
    return cleaned or "node"


class NodeConfig(SpecModel):
    node_id: Name
    data_dir: Path
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=DEFAULT_API_PORT, ge=1, le=65535)
    store: Literal["sqlite", "etcd"] = "sqlite"
    etcd_endpoints: list[str] = Field(default_factory=list)
    store_timeout_s: float = Field(default=5.0, gt=0, le=300)
    lease_ttl_s: int = Field(default=5, ge=1, le=3600)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    accel: Accel = Accel.AUTO
    vcpu_overcommit: float = Field(default=4.0, ge=1.0, le=64.0)
    kvm_probe_timeout_s: float = Field(default=8.0, gt=0, le=120)
    build_default_image: bool = True
    stop_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    #: Unused sections of the config file, reported at start.
    unused_sections: list[str] = Field(default_factory=list)

    @field_validator("etcd_endpoints")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} must start with http:// or https://")
        return value

    @property
    def api_url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "state.db"


#: TOML section -> key -> NodeConfig field.
_FILE_KEYS: dict[str, dict[str, str]] = {
    "cluster": {"node_id": "node_id", "data_dir": "data_dir", "log_level": "log_level"},
    "api": {"host": "api_host", "port": "api_port"},
    "store": {
        "backend": "store",
        "etcd_endpoints": "etcd_endpoints",
        "timeout_s": "store_timeout_s",
        "lease_ttl_s": "lease_ttl_s",
    },
    "microvm": {
        "accel": "accel",
        "vcpu_overcommit": "vcpu_overcommit",
        "kvm_probe_timeout_s": "kvm_probe_timeout_s",
        "build_default_image": "build_default_image",
        "stop_timeout_s": "stop_timeout_s",
    },
}


def read_config_file(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The settings a TOML file gives (as NodeConfig fields), and its unused sections."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValidationError("config", f"{path} does not exist") from None
    except OSError as exc:
        raise ValidationError("config", f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValidationError("config", f"{path} is not valid TOML: {exc}") from None
    settings: dict[str, Any] = {}
    unused: list[str] = []
    for section, body in raw.items():
        keys = _FILE_KEYS.get(section)
        if keys is None:
            unused.append(section)
            continue
        if not isinstance(body, dict):
            raise ValidationError(f"{path}: {section}", "must be a [section] of keys")
        for key, value in body.items():
            if key not in keys:
                known = ", ".join(sorted(keys))
                raise ValidationError(
                    f"{path}: {section}.{key}", f"is not a known setting (known: {known})"
                )
            settings[keys[key]] = value
    return settings, unused


def _file_field(path: Path, field: str) -> str:
    for section, keys in _FILE_KEYS.items():
        for key, name in keys.items():
            if name == field:
                return f"{path}: {section}.{key}"
    return f"{path}: {field}"


_ENV = {
    "node_id": "BLIXARD_NODE_ID",
    "data_dir": "BLIXARD_DATA_DIR",
    "api_host": "BLIXARD_API_HOST",
    "api_port": "BLIXARD_API_PORT",
    "store": "BLIXARD_STORE",
    "etcd_endpoints": "BLIXARD_ETCD_ENDPOINTS",
    "accel": "BLIXARD_ACCEL",
}


def load_config(
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    config_path: Path | None = None,
) -> NodeConfig:
    """Merge flags (None = not given) over BLIXARD_* over the config file over defaults."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {"node_id": default_node_id(), "data_dir": str(default_data_dir())}
    path = config_path or (Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None)
    file_fields: set[str] = set()
    if path is not None or DEFAULT_CONFIG.is_file():
        file_settings, unused = read_config_file(path or DEFAULT_CONFIG)
        data.update(file_settings)
        data["unused_sections"] = unused
        file_fields = set(file_settings)
    for field, var in _ENV.items():
        if var in env and env[var] != "":
            value: Any = env[var]
            if field == "etcd_endpoints":
                value = [v.strip() for v in value.split(",") if v.strip()]
            data[field] = value
            file_fields.discard(field)
    for field, value in flags.items():
        if value is not None:
            data[field] = value
            file_fields.discard(field)
    store_given = (
        flags.get("store") is not None or bool(env.get("BLIXARD_STORE")) or ("store" in file_fields)
    )
    if data.get("etcd_endpoints") and not store_given:
        data["store"] = "etcd"  # endpoints alone mean "use etcd"
    try:
        return parse(NodeConfig, data)
    except ValidationError as exc:
        if exc.field in file_fields and path is not None:
            raise ValidationError(_file_field(path, exc.field), exc.reason) from None
        if exc.field in file_fields:
            raise ValidationError(_file_field(DEFAULT_CONFIG, exc.field), exc.reason) from None
        raise
