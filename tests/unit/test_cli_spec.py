"""From flags and files to VM documents; no server needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from blixard.cli.spec import VMFlags, document_from_flags, load_document, name_document
from blixard.domain.errors import ValidationError
from blixard.domain.parse import parse
from blixard.domain.vm import VM


def test_only_given_flags_reach_the_document() -> None:
    doc = document_from_flags("web", VMFlags(command="python3 -c 'print(1)'"))
    assert doc == {
        "kind": "VM",
        "metadata": {"name": "web"},
        "spec": {
            "boot": {"command": ["python3", "-c", "print(1)"]},
            "hypervisor": "process",
        },
    }
    assert parse(VM, doc).spec.boot.command == ["python3", "-c", "print(1)"]


def test_units_are_parsed_by_the_domain_parser() -> None:
    doc = document_from_flags(
        "web", VMFlags(image="alpine", memory="1.5G", boot_timeout="2m", driver="qemu")
    )
    assert doc["spec"]["memory_mib"] == 1536 and doc["spec"]["boot_timeout_s"] == 120.0
    with pytest.raises(ValidationError) as info:
        document_from_flags("web", VMFlags(image="alpine", memory="lots"))
    assert info.value.field == "--memory"
    with pytest.raises(ValidationError) as info:
        document_from_flags("web", VMFlags(image="alpine", boot_timeout="10"))
    assert info.value.field == "--boot-timeout"


def test_bounds_stay_with_the_server() -> None:
    # Zero parses here; whether it is allowed is the server's (spec.memory_mib) call.
    doc = document_from_flags("web", VMFlags(image="alpine", memory="0M", vcpus=0))
    assert doc["spec"]["memory_mib"] == 0 and doc["spec"]["vcpus"] == 0


def test_relative_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    doc = document_from_flags("g", VMFlags(kernel="k", initrd="/abs/i", disk="d/disk.img"))
    assert doc["spec"]["boot"] == {
        "kernel": str(tmp_path / "k"),
        "initrd": "/abs/i",
        "disk": str(tmp_path / "d" / "disk.img"),
    }


def test_given_lists_the_flags_as_typed() -> None:
    assert VMFlags().given() == []
    assert VMFlags(vcpus=1, boot_timeout="1s").given() == ["--vcpus", "--boot-timeout"]


def test_load_document_reads_yaml_and_json_and_converts_dates(tmp_path: Path) -> None:
    f = tmp_path / "vm.yaml"
    f.write_text("metadata:\n  name: web\n  created_at: 2024-01-02T03:04:05Z\nspec: {}\n")
    doc = load_document(str(f))
    assert doc["metadata"]["created_at"] == "2024-01-02T03:04:05+00:00"
    g = tmp_path / "vm.json"
    g.write_text('{"metadata": {"name": "web"}}')
    assert load_document(str(g)) == {"metadata": {"name": "web"}}


@pytest.mark.parametrize(
    ("text", "where", "reason"),
    [
        (
            "a: [1, 2\n",
            ":2:1",
            "while parsing a flow sequence, expected ',' or ']', but got '<stream end>'",
        ),
        ("a: b: c\n", ":1:5", "mapping values are not allowed here"),
        (
            "a: 1\n---\nb: 2\n",
            ":2:1",
            "expected a single document in the stream, but found another document",
        ),
        ("a: 'open\n", ":2:1", "while scanning a quoted scalar, found unexpected end of stream"),
    ],
)
def test_malformed_yaml_names_file_line_and_column(
    tmp_path: Path, text: str, where: str, reason: str
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ValidationError) as info:
        load_document(str(f))
    assert info.value.field == f"{f}{where}"
    assert info.value.reason == f"malformed YAML: {reason}"


def test_name_document() -> None:
    assert name_document({"spec": {}}, "web", "f")["metadata"] == {"name": "web"}
    assert name_document({"metadata": {"name": "web"}}, "web", "f")["metadata"]["name"] == "web"
    assert name_document([1], "web", "f") == [1]  # the server says what is wrong
    with pytest.raises(ValidationError) as info:
        name_document({"metadata": {"name": "db"}}, "web", "f.yaml")
    assert info.value.field == "NAME" and "f.yaml names the VM 'db'" in info.value.reason


def test_placement_flags_become_the_placement_document() -> None:
    flags = VMFlags(
        command="sleep 1",
        node_selector="disk=ssd, zone=a",
        constraint="storage=nvme,memory>=32G",
        anti_affinity="web,db",
        strategy="spread",
        fencing="pause",
    )
    spec = document_from_flags("web", flags)["spec"]
    assert spec["fencing"] == "pause"
    assert spec["placement"] == {
        "node_selector": {"disk": "ssd", "zone": "a"},
        "constraints": "storage=nvme,memory>=32G",
        "anti_affinity_groups": ["web", "db"],
        "strategy": "spread",
    }
    assert "placement" not in document_from_flags("web", VMFlags(command="sleep 1"))["spec"]


@pytest.mark.parametrize("bad", ["disk", "=ssd", "disk=ssd,,"])
def test_a_malformed_node_selector_is_refused(bad: str) -> None:
    with pytest.raises(ValidationError) as err:
        document_from_flags("web", VMFlags(command="sleep 1", node_selector=bad))
    assert err.value.field == "--node-selector"
