"""The node's settings: flags over BLIXARD_* over the TOML file over defaults, and bad files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from blixard.daemon.config import load_config
from blixard.domain.errors import ValidationError
from blixard.domain.vm import Accel

FILE = """
[cluster]
node_id = "from-file"
data_dir = "/srv/blixard"
[api]
port = 7500
[store]
backend = "etcd"
etcd_endpoints = ["http://127.0.0.1:2379"]
[microvm]
accel = "tcg"
vcpu_overcommit = 2.0
[network]
bridge_name = "blixard0"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_file_settings_apply(tmp_path: Path) -> None:
    cfg = load_config({}, env={}, config_path=write(tmp_path, FILE))
    assert (cfg.node_id, cfg.data_dir, cfg.api_port) == ("from-file", Path("/srv/blixard"), 7500)
    assert cfg.store == "etcd" and cfg.etcd_endpoints == ["http://127.0.0.1:2379"]
    assert cfg.accel is Accel.TCG and cfg.vcpu_overcommit == 2.0
    assert cfg.unused_sections == ["network"]


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, FILE)
    env = {"BLIXARD_API_PORT": "7600", "BLIXARD_NODE_ID": "from-env", "BLIXARD_STORE": "sqlite"}
    cfg = load_config({"node_id": "from-flag", "api_port": None}, env=env, config_path=path)
    assert cfg.node_id == "from-flag"  # flag beats env and file
    assert cfg.api_port == 7600  # env beats file
    assert cfg.store == "sqlite"  # env beats file
    assert cfg.data_dir == Path("/srv/blixard")  # file beats default


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[cluster]\nnode_id = "via-env"\n')
    assert load_config({}, env={"BLIXARD_CONFIG": str(path)}).node_id == "via-env"


def test_endpoints_alone_mean_etcd() -> None:
    cfg = load_config({"etcd_endpoints": ["http://127.0.0.1:2379"]}, env={})
    assert cfg.store == "etcd"


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ('[microvm]\naccell = "tcg"\n', "microvm.accell", "is not a known setting"),
        ("[api]\nport = 70000\n", "api.port", "less than or equal to 65535"),
        ('[microvm]\naccel = "hvf"\n', "microvm.accel", "'auto', 'kvm' or 'tcg'"),
        ('[cluster]\nnode_id = "Not_A_Label"\n', "cluster.node_id", "DNS label"),
        ("[cluster\nnode_id = 1\n", "config", "not valid TOML"),
        ('cluster = "flat"\n', "cluster", "must be a [section]"),
    ],
)
def test_bad_files_name_file_key_and_reason(
    tmp_path: Path, text: str, field: str, reason: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValidationError) as info:
        load_config({}, env={}, config_path=path)
    assert field in info.value.field and reason in info.value.reason
    if field != "config":
        assert str(path) in info.value.field


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as info:
        load_config({}, env={}, config_path=tmp_path / "nope.toml")
    assert info.value.field == "config" and "does not exist" in info.value.reason


def test_node_start_with_a_bad_config_exits_2_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, '[microvm]\naccell = "tcg"\n')
    res = subprocess.run(
        [sys.executable, "-m", "blixard", "node", "start", "--config", str(path),
         "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 2
    assert "microvm.accell" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "d").exists()


def test_services_section_and_flags(tmp_path: Path) -> None:
    path = write(tmp_path, '[services]\ndriver = "process"\nunit_dirs = ["/srv/units"]\n')
    cfg = load_config({}, env={}, config_path=path)
    assert cfg.service_driver == "process" and cfg.unit_dirs == [Path("/srv/units")]
    flags = {"service_driver": "none", "unit_dirs": ["/a", "/b"]}
    cfg = load_config(flags, env={}, config_path=path)
    assert cfg.service_driver == "none" and cfg.unit_dirs == [Path("/a"), Path("/b")]
    default = load_config({}, env={}, config_path=write(tmp_path, ""))
    assert default.service_driver == "auto"
    assert default.unit_dirs == [Path("/etc/systemd/system")]
    for text, field in [
        ('[services]\ndriver = "docker"\n', "services.driver"),
        ('[services]\nunit_dirs = ["units"]\n', "services.unit_dirs"),
        ('[services]\nunit_dir = ["/x"]\n', "services.unit_dir"),
    ]:
        with pytest.raises(ValidationError) as info:
            load_config({}, env={}, config_path=write(tmp_path, text))
        assert field in info.value.field, info.value
