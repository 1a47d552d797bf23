"""`blixard vm ...` against a real API (uvicorn on 127.0.0.1, real SqliteStore)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from blixard.domain.instance import ObservedState
from blixard.domain.vm import VM
from tests.unit.test_cli_fixtures import Server, blixard, server

__all__ = ["server"]

CMD = "sleep 1000"


def _stored(server: Server, name: str) -> VM | None:
    return server.run(server.objects.find(VM, name))


def test_create_no_wait_prints_the_vm_in_every_format(server: Server, tmp_path: Path) -> None:
    res = blixard(server, "vm", "create", "web", "--command", CMD, "--memory", "1G", "--no-wait")
    assert res.code == 0, res.stderr
    assert "vm web created (not waiting" in res.stdout and "No instances yet." in res.stdout
    vm = _stored(server, "web")
    assert vm is not None and vm.spec.memory_mib == 1024 and vm.spec.hypervisor.value == "process"
    assert vm.spec.boot.command == ["sleep", "1000"]

    as_json = json.loads(blixard(server, "vm", "status", "web", "-o", "json").stdout)
    assert as_json["vm"]["metadata"]["name"] == "web" and as_json["instances"] == []
    as_yaml = yaml.safe_load(blixard(server, "vm", "status", "web", "-o", "yaml").stdout)
    assert as_yaml == as_json
    table = blixard(server, "vm", "status", "web")
    assert table.code == 0 and "Phase" in table.stdout and "0/1 running" in table.stdout
    assert "command sleep 1000" in table.stdout


def test_create_from_flags_builds_the_whole_document(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    monkeypatch.chdir(tmp_path)  # a relative --kernel means "from where I stand"
    res = blixard(
        server, "vm", "create", "guest", "--kernel", "vmlinux", "--vcpus", "2",
        "--memory", "256M", "--cmdline", "console=ttyS0", "--replicas", "3",
        "--ready-line", "login:", "--boot-timeout", "1m30s", "--accel", "tcg",
        "--no-wait", "-o", "json",
    )  # fmt: skip
    assert res.code == 0, res.stderr
    spec = json.loads(res.stdout)["vm"]["spec"]
    assert spec["boot"]["kernel"] == str(kernel) and spec["boot"]["cmdline"] == "console=ttyS0"
    assert (spec["vcpus"], spec["memory_mib"], spec["replicas"]) == (2, 256, 3)
    assert (spec["ready_line"], spec["boot_timeout_s"], spec["accel"]) == ("login:", 90.0, "tcg")
    assert spec["hypervisor"] == "qemu"


def test_create_from_a_yaml_file(server: Server, tmp_path: Path) -> None:
    spec = tmp_path / "web.yaml"
    spec.write_text(
        "kind: VM\nmetadata:\n  name: web\nspec:\n  hypervisor: process\n"
        "  memory_mib: 2G\n  boot:\n    command: [sleep, '1000']\n"
    )
    res = blixard(server, "vm", "create", "-f", str(spec), "--no-wait", "-o", "yaml")
    assert res.code == 0, res.stderr
    assert yaml.safe_load(res.stdout)["vm"]["spec"]["memory_mib"] == 2048
    # The same file under another name given on the command line disagrees: refused.
    res = blixard(server, "vm", "create", "other", "-f", str(spec), "--no-wait")
    assert res.code == 2 and "NAME: is 'other' but" in res.stderr
    # A JSON file is YAML too; NAME fills a missing name.
    doc = {"spec": {"hypervisor": "process", "boot": {"command": ["sleep", "1"]}}}
    (tmp_path / "x.json").write_text(json.dumps(doc))
    res = blixard(server, "vm", "create", "api", "-f", str(tmp_path / "x.json"), "--no-wait")
    assert res.code == 0, res.stderr
    assert _stored(server, "api") is not None


def test_create_from_stdin(server: Server) -> None:
    doc = "metadata: {name: piped}\nspec: {hypervisor: process, boot: {command: [sleep, '1']}}\n"
    res = blixard(server, "vm", "create", "-f", "-", "--no-wait", input=doc)
    assert res.code == 0, res.stderr
    assert _stored(server, "piped") is not None
    res = blixard(server, "vm", "create", "-f", "-", input="a: [\n")
    assert res.code == 2 and res.stderr.startswith("error: <stdin>:2:1: malformed YAML")


def test_malformed_yaml_names_file_line_and_reason(server: Server, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: VM\nmetadata:\n  name: web\n spec: [\n")
    res = blixard(server, "vm", "create", "-f", str(bad))
    assert res.code == 2
    line = res.stderr.strip()
    assert line.startswith(f"error: {bad}:4:") and "malformed YAML" in line
    assert "\n" not in line and "Traceback" not in res.stderr
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    res = blixard(server, "vm", "create", "-f", str(empty))
    assert res.code == 2 and "is empty" in res.stderr
    res = blixard(server, "vm", "create", "-f", str(tmp_path / "missing.yaml"))
    assert res.code == 2 and "does not exist" in res.stderr
    assert server.run(server.objects.store.range("/blixard/v1/vms/")).kvs == []


def test_bad_input_exits_2_with_the_field(server: Server) -> None:
    cases = [
        (["vm", "create", "web", "--command", CMD, "--memory", "0M"], "spec.memory_mib:"),
        (["vm", "create", "web", "--command", CMD, "--memory", "512"], "--memory: a size"),
        (["vm", "create", "web", "--command", CMD, "--vcpus", "0"], "spec.vcpus:"),
        (["vm", "create", "Bad_Name", "--command", CMD], "metadata.name:"),
        (["vm", "create", "web", "--kernel", "/no/kernel"], "spec.boot.kernel: file /no/kernel"),
        (["vm", "create", "web", "--image", "ubuntu"], "unknown image 'ubuntu' on node n1"),
        (["vm", "create", "web", "--command", CMD, "--driver", "vmware"], "spec.hypervisor:"),
        (["vm", "create", "web", "--command", "echo 'unclosed"], "--command: cannot be split"),
        (["vm", "create", "web", "--command", CMD, "--timeout", "soon"], "--timeout:"),
        (["vm", "create", "web", "-f", "x.yaml", "--vcpus", "2"], "-f: cannot be combined"),
        (["vm", "create"], "NAME: is required"),
        (["vm", "stop", "Bad_Name"], "name:"),
    ]
    for args, message in cases:
        res = blixard(server, *args)
        assert res.code == 2, (args, res.stdout, res.stderr)
        assert res.stderr.startswith("error: ") and message in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert server.run(server.objects.store.range("/blixard/v1/vms/")).kvs == []


def test_usage_errors_are_2(server: Server) -> None:
    assert blixard(server, "vm", "create", "web", "--vcpus", "two").code == 2
    assert blixard(server, "vm", "list", "-o", "xml").code == 2
    assert blixard(server, "vm", "frobnicate").code == 2


def test_unknown_vm_exits_1(server: Server) -> None:
    for action in ("start", "stop", "restart", "delete", "status", "logs"):
        res = blixard(server, "vm", action, "ghost")
        assert res.code == 1, (action, res.stderr)
        assert res.stderr.strip() == "error: vm 'ghost' does not exist", action


def test_duplicate_exits_1(server: Server) -> None:
    assert blixard(server, "vm", "create", "web", "--command", CMD, "--no-wait").code == 0
    res = blixard(server, "vm", "create", "web", "--command", CMD, "--no-wait")
    assert res.code == 1 and res.stderr.strip() == "error: vm 'web' already exists"


def test_lifecycle_without_waiting_changes_the_stored_spec(server: Server) -> None:
    blixard(server, "vm", "create", "web", "--command", CMD, "--no-wait")
    res = blixard(server, "vm", "stop", "web", "--no-wait", "-o", "json")
    assert res.code == 0 and json.loads(res.stdout)["vm"]["spec"]["running"] is False
    res = blixard(server, "vm", "start", "web", "--no-wait")
    assert res.code == 0 and "vm web started (not waiting" in res.stdout
    res = blixard(server, "vm", "restart", "web", "--no-wait", "-o", "yaml")
    assert yaml.safe_load(res.stdout)["vm"]["spec"]["restart_generation"] == 1
    vm = _stored(server, "web")
    assert vm is not None and vm.spec.running and vm.metadata.generation == 4
    res = blixard(server, "vm", "delete", "web", "--no-wait", "-o", "json")
    assert res.code == 0 and json.loads(res.stdout)["metadata"]["name"] == "web"
    assert _stored(server, "web") is None


def test_waiting_times_out_with_what_it_last_saw(server: Server) -> None:
    started = time.monotonic()
    res = blixard(server, "vm", "create", "web", "--command", CMD, "--timeout", "1s")
    assert res.code == 1
    assert res.stderr.strip() == (
        "error: timed out after 1s waiting for vm 'web' to be running; "
        "last seen: web-0: not created yet (vm pending) (the request itself was accepted; "
        "`blixard vm status web` shows progress)"
    )
    assert 1.0 <= time.monotonic() - started < 10
    assert _stored(server, "web") is not None  # the VM was created; only the wait failed
    server.add_instance("web", 0, ObservedState.FAILED, message="exit code 3", restarts=2)
    res = blixard(server, "vm", "start", "web", "--timeout", "500ms")
    assert res.code == 1
    assert "last seen: web-0: failed on n1 (exit code 3)" in res.stderr


def test_waiting_ends_as_soon_as_the_change_is_observed(server: Server) -> None:
    blixard(server, "vm", "create", "web", "--command", CMD, "--no-wait")
    server.add_instance("web", 0, ObservedState.RUNNING)
    res = blixard(server, "vm", "start", "web", "--timeout", "5s")
    assert res.code == 0, res.stderr
    assert "vm web started: every replica is running" in res.stdout
    assert "web-0" in res.stdout and "running" in res.stdout
    # Nothing restarts it here: restart waits for the agent to apply the restart, and times out.
    res = blixard(server, "vm", "restart", "web", "--timeout", "300ms")
    assert res.code == 1 and "(restart not applied yet)" in res.stderr


def test_delete_waits_until_instances_are_gone(server: Server) -> None:
    blixard(server, "vm", "create", "web", "--command", CMD, "--no-wait")
    server.add_instance("web", 0, ObservedState.RUNNING)
    res = blixard(server, "vm", "delete", "web", "--timeout", "400ms")
    assert res.code == 1 and "last seen: web-0: running on n1" in res.stderr
    assert _stored(server, "web") is None
    blixard(server, "vm", "create", "db", "--command", CMD, "--no-wait")
    res = blixard(server, "vm", "delete", "db")  # no instance was ever made
    assert res.code == 0 and "vm db deleted and its instances are gone" in res.stdout


def test_list_in_every_format(server: Server) -> None:
    assert blixard(server, "vm", "list").stdout.strip() == "No VMs."
    for name in ("web", "db"):
        blixard(server, "vm", "create", name, "--command", CMD, "--no-wait")
    server.add_instance("web", 0, ObservedState.RUNNING)
    table = blixard(server, "vm", "list")
    assert table.code == 0
    lines = table.stdout.strip().splitlines()
    assert lines[0].split() == [
        "NAME", "PHASE", "DESIRED", "RUNNING", "HYPERVISOR", "VCPUS", "MEMORY", "AGE",
    ]  # fmt: skip
    assert lines[1].split()[:7] == ["db", "pending", "running", "0/1", "process", "1", "512M"]
    assert lines[2].split()[:4] == ["web", "pending", "running", "1/1"]
    as_json = json.loads(blixard(server, "vm", "list", "-o", "json").stdout)
    assert [d["vm"]["metadata"]["name"] for d in as_json["items"]] == ["db", "web"]
    assert yaml.safe_load(blixard(server, "vm", "list", "-o", "yaml").stdout) == as_json


def test_logs_print_the_stream(server: Server) -> None:
    blixard(server, "vm", "create", "web", "--command", CMD, "--replicas", "2", "--no-wait")
    server.add_instance("web", 1, ObservedState.RUNNING)
    server.logs["web-1"] = [b"hello\n", b"world\n"]
    res = blixard(server, "vm", "logs", "web", "--replica", "1")
    assert res.code == 0 and res.stdout == "hello\nworld\n"
    res = blixard(server, "vm", "logs", "web")
    assert res.code == 1 and res.stderr.strip() == "error: vm 'web' has no instance 'web-0'"


def test_token_comes_from_the_data_dir_and_a_wrong_one_is_refused(
    server: Server, tmp_path: Path
) -> None:
    # The env carries no token: it is read from BLIXARD_DATA_DIR/admin.token.
    assert blixard(server, "vm", "list").code == 0
    res = blixard(server, "vm", "list", "--token", "blx_abc_" + "x" * 43)
    assert res.code == 1
    assert res.stderr.strip() == (
        f"error: invalid token: the API at {server.url} refused the token from --token"
    )
    res = blixard(server, "vm", "list", BLIXARD_TOKEN="blx_nope")
    assert res.code == 1 and "refused the token from BLIXARD_TOKEN" in res.stderr
    res = blixard(server, "vm", "list", BLIXARD_DATA_DIR=str(tmp_path / "elsewhere"))
    assert res.code == 2
    assert f"{tmp_path / 'elsewhere' / 'admin.token'} does not exist" in res.stderr


def test_unreachable_api_is_a_clear_error(server: Server) -> None:
    url = f"http://127.0.0.1:{server.port + 1 if server.port < 65535 else 1}"
    res = blixard(server, "vm", "list", "--api", url)
    assert res.code == 1
    assert res.stderr.strip() == (
        f"error: cannot reach the Blixard API at {url}: is `blixard node start` running?"
    )


def test_the_console_script_exits_the_same_way(server: Server) -> None:
    import subprocess  # noqa: PLC0415

    env = {**os.environ, "BLIXARD_DATA_DIR": str(server.data_dir), "BLIXARD_API": server.url}
    env.pop("BLIXARD_TOKEN", None)
    run = [sys.executable, "-m", "blixard", "vm"]
    ok = subprocess.run(
        [*run, "create", "web", "--command", CMD, "--no-wait", "-o", "json"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["vm"]["metadata"]["name"] == "web"
    bad = subprocess.run(
        [*run, "create", "web2", "--command", CMD, "--memory", "0M"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: spec.memory_mib:")
    assert "Traceback" not in bad.stderr
    gone = subprocess.run(
        [*run, "status", "ghost"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert gone.returncode == 1 and gone.stderr.strip() == "error: vm 'ghost' does not exist"
