"""`blixard node status|list` against a real API."""

from __future__ import annotations

import json

import yaml

from tests.unit.test_cli_fixtures import NODE, Server, blixard, server

__all__ = ["server"]


def test_node_status_defaults_to_the_answering_node(server: Server) -> None:
    res = blixard(server, "node", "status")
    assert res.code == 0, res.stderr
    rows = {line.split()[0]: line.split()[1:] for line in res.stdout.splitlines() if line.strip()}
    assert rows["Name"] == [NODE] and rows["Alive"] == ["yes"] and rows["API"] == [server.url]
    as_json = json.loads(blixard(server, "node", "status", NODE, "-o", "json").stdout)
    assert as_json["alive"] is True and as_json["node"]["metadata"]["name"] == NODE
    assert as_json["node"]["status"]["capacity"]["vcpus"] == 2
    as_yaml = yaml.safe_load(blixard(server, "node", "status", "-o", "yaml").stdout)
    assert as_yaml == as_json


def test_node_list_and_unknown_node(server: Server) -> None:
    res = blixard(server, "node", "list")
    assert res.code == 0
    header, row = res.stdout.strip().splitlines()
    assert header.split()[:3] == ["NAME", "ALIVE", "READY"] and row.split()[:3] == [
        NODE,
        "yes",
        "yes",
    ]
    items = json.loads(blixard(server, "node", "list", "-o", "json").stdout)["items"]
    assert [(d["node"]["metadata"]["name"], d["alive"]) for d in items] == [(NODE, True)]
    res = blixard(server, "node", "status", "n9")
    assert res.code == 1 and res.stderr.strip() == "error: node 'n9' does not exist"
