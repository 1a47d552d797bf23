"""The node's settings: flags override BLIXARD_* environment variables override defaults.

(The TOML config file joins this chain with the single-node issue.)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from blixard.client.config import default_data_dir
from blixard.domain.fields import Name
from blixard.domain.meta import SpecModel
from blixard.domain.parse import parse

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


_ENV = {
    "node_id": "BLIXARD_NODE_ID",
    "data_dir": "BLIXARD_DATA_DIR",
    "api_host": "BLIXARD_API_HOST",
    "api_port": "BLIXARD_API_PORT",
    "store": "BLIXARD_STORE",
    "etcd_endpoints": "BLIXARD_ETCD_ENDPOINTS",
}


def load_config(flags: Mapping[str, Any], env: Mapping[str, str] | None = None) -> NodeConfig:
    """Merge flags (None = not given) over BLIXARD_* variables over defaults, then validate."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {"node_id": default_node_id(), "data_dir": str(default_data_dir())}
    for field, var in _ENV.items():
        if var in env and env[var] != "":
            value: Any = env[var]
            if field == "etcd_endpoints":
                value = [v.strip() for v in value.split(",") if v.strip()]
            data[field] = value
    for field, value in flags.items():
        if value is not None:
            data[field] = value
    if data.get("etcd_endpoints") and flags.get("store") is None and not env.get("BLIXARD_STORE"):
        data["store"] = "etcd"
    return parse(NodeConfig, data)
