"""The node's settings: flags over BLIXARD_* variables over the config file over defaults.

The config file is TOML (default ``/etc/blixard/config.toml``, or ``--config``
/ ``BLIXARD_CONFIG``), with the sections of the design brief::

    [cluster]   node_id, data_dir, log_level, cluster_init, join, join_token,
                advertise_address, etcd_members, zone, labels
    [api]       host, port
    [store]     backend ("sqlite" | "etcd"), etcd_endpoints, timeout_s, lease_ttl_s,
                etcd_client_port, etcd_peer_port
    [microvm]   accel ("auto" | "kvm" | "tcg"), vcpu_overcommit, kvm_probe_timeout_s,
                build_default_image, stop_timeout_s
    [services]  driver ("auto" | "systemd" | "process" | "none"), unit_dirs
    [functions] gateway_port (0: no gateway), runtimes

A key Blixard does not know in one of these sections is an error (a typo must
not be ignored silently); other sections of the brief (``[discovery]``,
``[network]``, ...) belong to features not built yet and are reported as
unused, not refused.

How the node finds its store: ``--cluster-init`` (run the first member of a
new etcd cluster here), ``--join URL`` (through any node's API, with a join
token), ``--etcd-endpoints`` (an external etcd), or the embedded SQLite file.
The first three exclude each other; the first two imply the etcd store.
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
from blixard.domain.fields import Labels, LabelValue, Name
from blixard.domain.meta import SpecModel
from blixard.domain.node import Address, ApiUrl
from blixard.domain.parse import parse
from blixard.domain.token import Unauthorized, split_token
from blixard.domain.vm import Accel

DEFAULT_CONFIG = Path("/etc/blixard/config.toml")
CONFIG_ENV = "BLIXARD_CONFIG"
DEFAULT_API_PORT = 7400
DEFAULT_GATEWAY_PORT = 7480
FunctionRuntimeName = Literal["nix", "command", "microvm"]
FUNCTION_RUNTIMES: tuple[FunctionRuntimeName, ...] = ("nix", "command", "microvm")
DEFAULT_ETCD_CLIENT_PORT = 2379
DEFAULT_ETCD_PEER_PORT = 2380
DEFAULT_ETCD_MEMBERS = 3
JOIN_TOKEN_ENV = "BLIXARD_JOIN_TOKEN"


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
    #: Start a new etcd cluster with this node's supervised member as its first member.
    cluster_init: bool = False
    #: Join the cluster through this node's API URL (``http://10.0.0.1:7400``).
    join: ApiUrl | None = None
    #: The secret presented to ``join`` (never logged or shown).
    join_token: str | None = Field(default=None, repr=False)
    #: The address other nodes reach this one at (etcd URLs, the node's API URL).
    advertise_address: Address | None = None
    etcd_client_port: int = Field(default=DEFAULT_ETCD_CLIENT_PORT, ge=1, le=65535)
    etcd_peer_port: int = Field(default=DEFAULT_ETCD_PEER_PORT, ge=1, le=65535)
    #: How many etcd members the cluster grows to (set by --cluster-init); nodes joining
    #: past it are agents only. etcd recommends 3 or 5.
    etcd_members: int = Field(default=DEFAULT_ETCD_MEMBERS, ge=1, le=7)
    zone: LabelValue | None = None
    labels: Labels = Field(default_factory=dict)
    #: The function gateway's port (HTTP triggers, node-to-node forwarding), on api_host;
    #: 0 runs no gateway (the node then takes no function workers).
    gateway_port: int = Field(default=DEFAULT_GATEWAY_PORT, ge=0, le=65535)
    #: Function runtimes this node offers (docs/functions.md).
    function_runtimes: list[FunctionRuntimeName] = Field(
        default_factory=lambda: list(FUNCTION_RUNTIMES)
    )
    #: What runs Services' units here (docs/services.md): systemd over D-Bus, their
    #: ExecStart= as processes, none, or auto (systemd if it answers on the system bus).
    service_driver: Literal["auto", "systemd", "process", "none"] = "auto"
    #: Where the process unit driver looks for unit files, first match wins.
    unit_dirs: list[Path] = Field(default_factory=lambda: [Path("/etc/systemd/system")])
    #: Unused sections of the config file, reported at start.
    unused_sections: list[str] = Field(default_factory=list)

    @field_validator("etcd_endpoints")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} must start with http:// or https://")
        return value

    @field_validator("unit_dirs")
    @classmethod
    def _unit_dirs(cls, value: list[Path]) -> list[Path]:
        for path in value:
            if not path.is_absolute():
                raise ValueError(f"{str(path)!r} must be an absolute directory path")
        return value

    @property
    def advertise(self) -> str:
        """The address other nodes reach this one at: --advertise-address, else api_host."""
        return self.advertise_address or self.api_host

    @property
    def api_url(self) -> str:
        return f"http://{url_host(self.advertise)}:{self.api_port}"

    @property
    def gateway_url(self) -> str | None:
        if not self.gateway_port:
            return None
        return f"http://{url_host(self.advertise)}:{self.gateway_port}"

    @property
    def etcd_client_url(self) -> str:
        return f"http://{url_host(self.advertise)}:{self.etcd_client_port}"

    @property
    def etcd_peer_url(self) -> str:
        return f"http://{url_host(self.advertise)}:{self.etcd_peer_port}"

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "state.db"


def url_host(address: str) -> str:
    """An address as the host part of a URL (IPv6 in brackets)."""
    return f"[{address}]" if ":" in address else address


#: TOML section -> key -> NodeConfig field.
_FILE_KEYS: dict[str, dict[str, str]] = {
    "cluster": {
        "node_id": "node_id",
        "data_dir": "data_dir",
        "log_level": "log_level",
        "cluster_init": "cluster_init",
        "join": "join",
        "join_token": "join_token",
        "advertise_address": "advertise_address",
        "etcd_members": "etcd_members",
        "zone": "zone",
        "labels": "labels",
    },
    "api": {"host": "api_host", "port": "api_port"},
    "store": {
        "backend": "store",
        "etcd_endpoints": "etcd_endpoints",
        "timeout_s": "store_timeout_s",
        "lease_ttl_s": "lease_ttl_s",
        "etcd_client_port": "etcd_client_port",
        "etcd_peer_port": "etcd_peer_port",
    },
    "microvm": {
        "accel": "accel",
        "vcpu_overcommit": "vcpu_overcommit",
        "kvm_probe_timeout_s": "kvm_probe_timeout_s",
        "build_default_image": "build_default_image",
        "stop_timeout_s": "stop_timeout_s",
    },
    "services": {"driver": "service_driver", "unit_dirs": "unit_dirs"},
    "functions": {"gateway_port": "gateway_port", "runtimes": "function_runtimes"},
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
    "gateway_port": "BLIXARD_GATEWAY_PORT",
    "store": "BLIXARD_STORE",
    "etcd_endpoints": "BLIXARD_ETCD_ENDPOINTS",
    "accel": "BLIXARD_ACCEL",
    "join_token": JOIN_TOKEN_ENV,
}


def load_config(
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    config_path: Path | None = None,
) -> NodeConfig:
    """Merge flags (None = not given) over BLIXARD_* over the config file over defaults.

    ``flags`` may also hold ``join_token_file`` (read here into ``join_token``).
    """
    env = os.environ if env is None else env
    flags = dict(flags)
    token_file = flags.pop("join_token_file", None)
    if token_file is not None:
        if flags.get("join_token") is not None:
            raise ValidationError(
                "join_token_file", "give either --join-token or --join-token-file, not both"
            )
        flags["join_token"] = _read_join_token_file(Path(token_file))
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
        config = parse(NodeConfig, data)
    except ValidationError as exc:
        if exc.field in file_fields and path is not None:
            raise ValidationError(_file_field(path, exc.field), exc.reason) from None
        if exc.field in file_fields:
            raise ValidationError(_file_field(DEFAULT_CONFIG, exc.field), exc.reason) from None
        raise
    return check_cluster_settings(config, store_given=store_given)


def check_cluster_settings(config: NodeConfig, *, store_given: bool) -> NodeConfig:
    """Refuse contradictory ways of finding the store; --cluster-init/--join imply etcd."""
    modes = [
        (flag, given)
        for flag, given in (
            ("--cluster-init", config.cluster_init),
            ("--join", config.join is not None),
            ("--etcd-endpoints", bool(config.etcd_endpoints)),
        )
        if given
    ]
    if len(modes) > 1:
        first, second = modes[0][0], modes[1][0]
        field = second.removeprefix("--").replace("-", "_")
        raise ValidationError(
            field,
            f"{first} and {second} cannot be combined: --cluster-init starts a new cluster, "
            "--join joins one through a node's API, --etcd-endpoints uses an external etcd",
        )
    if config.gateway_port and config.gateway_port == config.api_port:
        raise ValidationError(
            "gateway_port", f"{config.gateway_port} is also the api_port; each needs its own port"
        )
    if not (config.cluster_init or config.join):
        return config
    flag = "--cluster-init" if config.cluster_init else "--join"
    if store_given and config.store != "etcd":
        raise ValidationError(
            "store", f"{flag} runs on etcd; it cannot be combined with --store {config.store}"
        )
    if config.join is not None:
        if not config.join_token:
            raise ValidationError(
                "join_token",
                "--join needs the cluster's join token: --join-token, --join-token-file or "
                f"{JOIN_TOKEN_ENV} (print it on a cluster node: blixard cluster join-token)",
            )
        try:
            split_token(config.join_token.strip())
        except Unauthorized:
            raise ValidationError(
                "join_token", "is not a Blixard token (blx_<id>_<secret>)"
            ) from None
    if config.advertise in {"0.0.0.0", "::"}:
        raise ValidationError(
            "advertise_address",
            f"other nodes cannot reach {config.advertise}; give the address they should use "
            "(--advertise-address)",
        )
    ports = {
        "api_port": config.api_port,
        "gateway_port": config.gateway_port,
        "etcd_client_port": config.etcd_client_port,
        "etcd_peer_port": config.etcd_peer_port,
    }
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if port in seen:
            raise ValidationError(name, f"{port} is also the {seen[port]}; each needs its own port")
        seen[port] = name
    return config.model_copy(update={"store": "etcd"})


def _read_join_token_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ValidationError("join_token_file", f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValidationError("join_token_file", f"cannot read {path}: {reason}") from None
    if not text:
        raise ValidationError("join_token_file", f"{path} is empty")
    return text
