"""Cluster settings of `blixard node start`: flags, BLIXARD_JOIN_TOKEN, the TOML file, and
the combinations that are refused (each naming the field and the reason)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blixard.daemon.cluster import ClusterError, open_cluster
from blixard.daemon.commands import parse_labels
from blixard.daemon.config import load_config
from blixard.domain.errors import ValidationError

TOKEN = "blx_0123456789ab_" + "s" * 43
JOIN = "http://10.0.0.1:7400"


def cfg(flags: dict[str, Any], env: dict[str, str] | None = None, path: Path | None = None) -> Any:
    return load_config(flags, env=env or {}, config_path=path)


def refused(flags: dict[str, Any], env: dict[str, str] | None = None) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        cfg(flags, env)
    return info.value


def test_defaults_are_a_standalone_node() -> None:
    c = cfg({})
    assert not c.cluster_init and c.join is None and c.store == "sqlite"
    assert (c.etcd_client_port, c.etcd_peer_port, c.etcd_members) == (2379, 2380, 3)
    assert c.labels == {} and c.zone is None and c.advertise == "127.0.0.1"


def test_cluster_init_implies_etcd_and_builds_urls_from_the_advertised_address() -> None:
    c = cfg(
        {
            "cluster_init": True,
            "advertise_address": "10.0.0.5",
            "api_host": "0.0.0.0",
            "etcd_client_port": 12379,
            "etcd_peer_port": 12380,
            "etcd_members": 5,
        }
    )
    assert c.store == "etcd" and c.etcd_members == 5
    assert c.etcd_client_url == "http://10.0.0.5:12379"
    assert c.etcd_peer_url == "http://10.0.0.5:12380"
    assert c.api_url.startswith("http://10.0.0.5:")


def test_ipv6_addresses_are_bracketed_in_urls() -> None:
    c = cfg({"cluster_init": True, "advertise_address": "::1"})
    assert c.etcd_peer_url == "http://[::1]:2380"


def test_join_takes_its_token_from_flag_env_or_file(tmp_path: Path) -> None:
    assert cfg({"join": JOIN, "join_token": TOKEN}).join_token == TOKEN
    env_cfg = cfg({"join": JOIN}, env={"BLIXARD_JOIN_TOKEN": TOKEN})
    assert env_cfg.join_token == TOKEN and env_cfg.store == "etcd"
    token_file = tmp_path / "join.token"
    token_file.write_text(TOKEN + "\n")
    assert cfg({"join": JOIN, "join_token_file": token_file}).join_token == TOKEN
    assert TOKEN not in repr(cfg({"join": JOIN, "join_token": TOKEN}))  # never logged


def test_file_settings_under_cluster_and_store(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[cluster]\njoin = "{JOIN}"\njoin_token = "{TOKEN}"\nadvertise_address = "10.0.0.7"\n'
        'zone = "eu-1"\nlabels = {gpu = "a100", "blixard.dev/rack" = "r7"}\netcd_members = 5\n'
        "[store]\netcd_client_port = 3379\netcd_peer_port = 3380\n"
    )
    c = cfg({}, path=path)
    assert c.join == JOIN and c.join_token == TOKEN and c.zone == "eu-1"
    assert c.labels == {"gpu": "a100", "blixard.dev/rack": "r7"}
    assert (c.etcd_client_port, c.etcd_peer_port, c.etcd_members) == (3379, 3380, 5)
    assert c.etcd_peer_url == "http://10.0.0.7:3380"


@pytest.mark.parametrize(
    ("flags", "field", "words"),
    [
        ({"cluster_init": True, "join": JOIN, "join_token": TOKEN}, "join", "--join"),
        (
            {"cluster_init": True, "etcd_endpoints": ["http://127.0.0.1:2379"]},
            "etcd_endpoints",
            "--etcd-endpoints",
        ),
        (
            {"join": JOIN, "join_token": TOKEN, "etcd_endpoints": ["http://127.0.0.1:2379"]},
            "etcd_endpoints",
            "--join and --etcd-endpoints",
        ),
    ],
)
def test_ways_of_finding_the_store_exclude_each_other(
    flags: dict[str, Any], field: str, words: str
) -> None:
    exc = refused(flags)
    assert exc.field == field and words in exc.reason and "cannot be combined" in exc.reason


def test_both_flags_are_named_when_init_and_join_are_combined() -> None:
    exc = refused({"cluster_init": True, "join": JOIN, "join_token": TOKEN})
    assert "--cluster-init" in exc.reason and "--join" in exc.reason


@pytest.mark.parametrize(
    ("flags", "field", "reason"),
    [
        ({"join": JOIN}, "join_token", "--join needs the cluster's join token"),
        ({"join": JOIN, "join_token": "secret"}, "join_token", "is not a Blixard token"),
        ({"join": "10.0.0.1:7400", "join_token": TOKEN}, "join", "http:// or https://"),
        ({"cluster_init": True, "store": "sqlite"}, "store", "runs on etcd"),
        ({"cluster_init": True, "api_host": "0.0.0.0"}, "advertise_address", "cannot reach"),
        ({"cluster_init": True, "etcd_peer_port": 2379}, "etcd_peer_port", "etcd_client_port"),
        ({"cluster_init": True, "api_port": 2380}, "etcd_peer_port", "api_port"),
        ({"etcd_members": 0}, "etcd_members", "greater than or equal to 1"),
        ({"etcd_client_port": 70000}, "etcd_client_port", "less than or equal to 65535"),
        ({"zone": "Eu 1"}, "zone", "label"),
        ({"labels": {"bad key": "x"}}, "labels", "label key name"),
        ({"labels": {"gpu": "no spaces"}}, "labels", "for key 'gpu'"),
        ({"advertise_address": "10.0.0.300"}, "advertise_address", "IP address or a DNS"),
        (
            {"join": JOIN, "join_token": TOKEN, "join_token_file": "/x"},
            "join_token_file",
            "not both",
        ),
        ({"join": JOIN, "join_token_file": "/no/such/file"}, "join_token_file", "does not exist"),
    ],
)
def test_bad_cluster_settings_name_field_and_reason(
    flags: dict[str, Any], field: str, reason: str
) -> None:
    exc = refused(flags)
    assert exc.field == field, exc
    assert reason in exc.reason, exc


def test_bad_setting_in_the_file_names_the_file_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[cluster]\nlabels = {"bad key" = "x"}\n')
    with pytest.raises(ValidationError) as info:
        cfg({}, path=path)
    assert info.value.field == f"{path}: cluster.labels"


def test_label_flags_parse_as_key_value() -> None:
    assert parse_labels(["gpu=a100", "empty=", "x/y=z=1"]) == {
        "gpu": "a100",
        "empty": "",
        "x/y": "z=1",
    }
    for bad in (["gpu"], ["=v"]):
        with pytest.raises(ValidationError, match="KEY=VALUE"):
            parse_labels(bad)
    with pytest.raises(ValidationError, match="more than once"):
        parse_labels(["a=1", "a=2"])


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--cluster-init", "--join", JOIN, "--join-token", TOKEN], ["--cluster-init", "--join"]),
        (["--label", "bad key=1"], ["labels", "label key name"]),
        (["--label", "novalue"], ["labels", "KEY=VALUE"]),
        (["--join", JOIN], ["join_token"]),
    ],
)
def test_node_start_refuses_bad_cluster_flags_with_exit_2(
    tmp_path: Path, args: list[str], words: list[str]
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLIXARD_")}
    command = [sys.executable, "-m", "blixard", "node", "start", "--data-dir", str(tmp_path / "d")]
    res = subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert res.returncode == 2, res.stderr
    assert all(w in res.stderr for w in words), res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()  # nothing created


# ------------------------------------------------------------------ <data dir>/cluster.json


def _write_cluster_file(data_dir: Path, text: str) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "cluster.json").write_text(text)


async def test_a_damaged_cluster_file_is_a_clear_error(tmp_path: Path) -> None:
    _write_cluster_file(tmp_path, "{not json")
    with pytest.raises(ClusterError, match=r"cluster.json is damaged.*--join"):
        await open_cluster(cfg({"data_dir": str(tmp_path)}))


async def test_a_cluster_file_of_another_node_is_refused(tmp_path: Path) -> None:
    _write_cluster_file(
        tmp_path, '{"role": "agent", "node_id": "n7", "endpoints": ["http://127.0.0.1:1"]}'
    )
    with pytest.raises(ValidationError) as info:
        await open_cluster(cfg({"data_dir": str(tmp_path), "node_id": "n8"}))
    assert info.value.field == "node_id" and "--node-id n7" in info.value.reason


async def test_external_endpoints_on_a_clustered_data_dir_are_refused(tmp_path: Path) -> None:
    _write_cluster_file(
        tmp_path, '{"role": "agent", "node_id": "n7", "endpoints": ["http://127.0.0.1:1"]}'
    )
    flags = {"data_dir": str(tmp_path), "etcd_endpoints": ["http://127.0.0.1:2379"]}
    with pytest.raises(ValidationError) as info:
        await open_cluster(cfg(flags))
    assert info.value.field == "etcd_endpoints" and "cluster.json" in info.value.reason


async def test_a_member_file_without_member_data_says_what_to_do(tmp_path: Path) -> None:
    _write_cluster_file(
        tmp_path,
        '{"role": "member", "node_id": "n7", "client_url": "http://127.0.0.1:1", '
        '"peer_url": "http://127.0.0.1:2", "endpoints": []}',
    )
    with pytest.raises(ClusterError, match=r"has no member data; delete cluster\.json"):
        await open_cluster(cfg({"data_dir": str(tmp_path), "node_id": "n7"}))
