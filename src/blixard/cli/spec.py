"""From what the user typed to a VM document for the API.

The server is the authority on what a valid VM is; this module only turns
flags (or a YAML/JSON file) into the document the API takes. It parses what
only the command line has: sizes and durations written as text (through
:mod:`blixard.domain.units`, the one parser of units), a shell-like
``--command`` string, and relative paths, which mean "from where I stand" on
the command line but would mean nothing to the daemon.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, fields
from datetime import date, datetime, time
from typing import Any

import yaml

from blixard.domain.errors import ValidationError
from blixard.domain.units import parse_duration_s, to_mib


@dataclass(frozen=True, slots=True)
class VMFlags:
    """The ``vm create`` flags that describe the VM (None = not given)."""

    vcpus: int | None = None
    memory: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    disk: str | None = None
    cmdline: str | None = None
    image: str | None = None
    command: str | None = None
    driver: str | None = None
    replicas: int | None = None
    ready_line: str | None = None
    boot_timeout: str | None = None
    accel: str | None = None
    node_selector: str | None = None
    constraint: str | None = None
    anti_affinity: str | None = None
    strategy: str | None = None
    fencing: str | None = None

    def given(self) -> list[str]:
        """The flags that were given, as typed (``--boot-timeout``)."""
        return [
            "--" + f.name.replace("_", "-")
            for f in fields(self)
            if getattr(self, f.name) is not None
        ]


def _host_path(value: str) -> str:
    return value if value.startswith("/") else os.path.abspath(value)


def document_from_flags(name: str, flags: VMFlags) -> dict[str, Any]:
    """A VM document holding only what the flags say; the server fills its defaults."""
    boot: dict[str, Any] = {}
    for key in ("kernel", "initrd", "disk"):
        value = getattr(flags, key)
        if value is not None:
            boot[key] = _host_path(value)
    if flags.cmdline is not None:
        boot["cmdline"] = flags.cmdline
    if flags.image is not None:
        boot["image"] = flags.image
    if flags.command is not None:
        try:
            boot["command"] = shlex.split(flags.command)
        except ValueError as exc:
            raise ValidationError(
                "--command", f"cannot be split like a shell would: {exc}"
            ) from None
    spec: dict[str, Any] = {"boot": boot}
    hypervisor = flags.driver
    if hypervisor is None and flags.command is not None:
        hypervisor = "process"  # the only hypervisor that runs a command
    if hypervisor is not None:
        spec["hypervisor"] = hypervisor
    if flags.vcpus is not None:
        spec["vcpus"] = flags.vcpus
    if flags.memory is not None:
        spec["memory_mib"] = to_mib(flags.memory, "--memory", allow_zero=True)
    if flags.replicas is not None:
        spec["replicas"] = flags.replicas
    if flags.ready_line is not None:
        spec["ready_line"] = flags.ready_line
    if flags.boot_timeout is not None:
        spec["boot_timeout_s"] = parse_duration_s(
            flags.boot_timeout, "--boot-timeout", allow_zero=True
        )
    if flags.accel is not None:
        spec["accel"] = flags.accel
    if flags.fencing is not None:
        spec["fencing"] = flags.fencing
    placement: dict[str, Any] = {}
    if flags.node_selector is not None:
        placement["node_selector"] = _pairs(flags.node_selector, "--node-selector")
    if flags.constraint is not None:
        placement["constraints"] = flags.constraint  # the server parses "a=b,mem>=32G"
    if flags.anti_affinity is not None:
        placement["anti_affinity_groups"] = [g.strip() for g in flags.anti_affinity.split(",")]
    if flags.strategy is not None:
        placement["strategy"] = flags.strategy
    if placement:
        spec["placement"] = placement
    return {"kind": "VM", "metadata": {"name": name}, "spec": spec}


def _pairs(text: str, flag: str) -> dict[str, str]:
    """``"disk=ssd,zone=a"`` as a mapping; the server checks the keys and values."""
    out: dict[str, str] = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValidationError(flag, f"must be key=value[,key=value...], got {text!r}")
        out[key.strip()] = value.strip()
    return out


def load_document(path: str) -> Any:
    """A YAML (or JSON: YAML reads it too) document from ``path``, or ``-`` for stdin.

    Malformed text is refused as ``<file>:<line>:<column>`` and the parser's reason.
    """
    shown = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except FileNotFoundError:
        raise ValidationError("-f", f"file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ValidationError(shown, "is not UTF-8 text") from None
    except OSError as exc:
        raise ValidationError("-f", f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark is not None else shown
        parts = [part for part in (exc.context, exc.problem) if part]
        reason = ", ".join(parts) or "cannot be parsed"
        raise ValidationError(where, f"malformed YAML: {reason}") from None
    except yaml.YAMLError as exc:
        raise ValidationError(shown, f"malformed YAML: {exc}") from None
    if data is None:
        raise ValidationError(shown, "is empty; it should hold one VM document")
    return jsonable(data)


def jsonable(data: Any) -> Any:
    """YAML's timestamps (``created_at: 2024-01-01``) as ISO text, so the document is JSON."""
    if isinstance(data, dict):
        return {str(k) if not isinstance(k, str) else k: jsonable(v) for k, v in data.items()}
    if isinstance(data, list):
        return [jsonable(v) for v in data]
    if isinstance(data, datetime | date | time):
        return data.isoformat()
    return data


def name_document(document: Any, name: str | None, source: str) -> Any:
    """Give a file's document the NAME argument, which must agree with any name it has."""
    if name is None or not isinstance(document, dict):
        return document
    meta = document.setdefault("metadata", {})
    if not isinstance(meta, dict):
        return document  # the server says what is wrong with it
    if "name" in meta and meta["name"] != name:
        raise ValidationError(
            "NAME",
            f"is {name!r} but {source} names the VM {meta['name']!r}; drop NAME or make them agree",
        )
    meta["name"] = name
    return document
