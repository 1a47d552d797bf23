"""Long-lived VMs: what users ask for, and what the controllers report.

A VM is a template with ``replicas``; each replica is an
:class:`blixard.domain.instance.Instance` placed on one node.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from blixard.domain.errors import ValidationError
from blixard.domain.fields import (
    DURATION_SCHEMA,
    MAX_VCPUS,
    MemoryMiB,
    Name,
    bridge,
    duration_s,
    refuse,
)
from blixard.domain.keys import Kind
from blixard.domain.meta import SpecModel, StatusModel, StoredObject
from blixard.domain.names import DNS_LABEL_MAX, validate_unit_name
from blixard.domain.placement import Placement

MAX_REPLICAS = 1000
#: A VM name leaves room for "-<index>" so every instance name is a DNS label.
MAX_VM_NAME = DNS_LABEL_MAX - 1 - len(str(MAX_REPLICAS - 1))
MAX_PATH = 4096
MAX_CMDLINE = 4096

_IMAGE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(:[A-Za-z0-9_.-]{1,128})?")
_FLAKE = re.compile(r"[^\s#-][^\s#]*#[A-Za-z0-9_.'\"-]+")


class Hypervisor(StrEnum):
    """What runs a guest. ``process`` and ``systemd`` run no VM (tests, services)."""

    QEMU = "qemu"
    FIRECRACKER = "firecracker"
    CLOUD_HYPERVISOR = "cloud-hypervisor"
    CROSVM = "crosvm"
    KVMTOOL = "kvmtool"
    STRATOVIRT = "stratovirt"
    ALIOTH = "alioth"
    PROCESS = "process"
    SYSTEMD = "systemd"


class RestartMode(StrEnum):
    """When an exited replica is started again (on its node)."""

    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


class Fencing(StrEnum):
    """What an agent does to this VM's replicas when it loses its lease.

    ``stop`` and ``pause`` ask for exclusivity: the replica is stopped (or
    paused) before the lease can expire, so the failover controller may start
    it elsewhere without two copies ever running. ``none`` keeps it running
    and the VM is then never failed over automatically.
    """

    STOP = "stop"
    PAUSE = "pause"
    NONE = "none"


def validate_host_path(value: Any, field: str) -> str:
    """An absolute, normalised host path without control characters."""
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a path string, got {value!r}")
    if not value.startswith("/"):
        raise ValidationError(field, f"must be an absolute path, got {value!r}")
    if len(value) > MAX_PATH:
        raise ValidationError(field, f"must be at most {MAX_PATH} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValidationError(field, f"must not contain control characters, got {value!r}")
    if ".." in PurePosixPath(value).parts:
        raise ValidationError(field, f"must not contain '..' components, got {value!r}")
    return value


def validate_cmdline(value: Any, field: str) -> str:
    """A kernel command line: one line of printable text."""
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {value!r}")
    if len(value) > MAX_CMDLINE:
        raise ValidationError(field, f"must be at most {MAX_CMDLINE} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValidationError(field, "must be one line without control characters")
    return value


def validate_image_ref(value: Any, field: str) -> str:
    """A guest image known to the image builder: ``name`` or ``name:tag``."""
    if not isinstance(value, str) or _IMAGE.fullmatch(value) is None or len(value) > 200:
        raise ValidationError(
            field,
            f"must be an image name (a DNS label) with an optional ':tag', got {value!r}",
        )
    return value


def validate_flake_ref(value: Any, field: str) -> str:
    """A microvm.nix flake reference ``<flake>#<nixosConfiguration>``.

    The attribute is required because microvm.nix needs to know which
    configuration to run; a leading ``-`` is refused so the reference can
    never be read as an option of the ``nix``/``microvm`` command.
    """
    if not isinstance(value, str) or _FLAKE.fullmatch(value) is None or len(value) > MAX_PATH:
        raise ValidationError(
            field,
            "must be a flake reference '<flake>#<name>' without spaces "
            f"(e.g. 'github:me/vms#web' or '/etc/vms#web'), got {value!r}",
        )
    return value


HostPath = Annotated[str, BeforeValidator(bridge(validate_host_path))]
Cmdline = Annotated[str, BeforeValidator(bridge(validate_cmdline))]
ImageRef = Annotated[str, BeforeValidator(bridge(validate_image_ref))]
FlakeRef = Annotated[str, BeforeValidator(bridge(validate_flake_ref))]
BackoffS = Annotated[float, duration_s(maximum_s=86_400.0), DURATION_SCHEMA]
BootTimeoutS = Annotated[float, duration_s(maximum_s=3600.0), DURATION_SCHEMA]


def validate_command_arg(value: Any, field: str) -> str:
    """One argv element: a string without NUL or newlines, at most 4096 characters."""
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {value!r}")
    if len(value) > MAX_CMDLINE:
        raise ValidationError(field, f"must be at most {MAX_CMDLINE} characters")
    if "\x00" in value or "\n" in value:
        raise ValidationError(field, "must not contain NUL or newline characters")
    return value


CommandArg = Annotated[str, BeforeValidator(bridge(validate_command_arg))]
#: A systemd unit name, checked by the domain's rule (``.service`` added when no type).
UnitName = Annotated[str, BeforeValidator(bridge(validate_unit_name))]


class Accel(StrEnum):
    """QEMU's accelerator. ``auto`` uses KVM only where a probe guest booted with it."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class BootSource(SpecModel):
    """How the guest boots: exactly one of ``kernel``, ``image``, ``flake``, ``command``
    or ``unit``.

    ``initrd``, ``disk`` and ``cmdline`` go with ``kernel`` only: an image and a
    flake bring their own. ``command`` is the workload of the ``process``
    hypervisor: an argv run as a supervised process instead of a guest.
    ``unit`` is the workload of the ``systemd`` hypervisor: a systemd unit
    installed on the host (what a Service runs, see domain/service.py).
    """

    kernel: HostPath | None = None
    initrd: HostPath | None = None
    disk: HostPath | None = None
    cmdline: Cmdline | None = None
    image: ImageRef | None = None
    flake: FlakeRef | None = None
    command: list[CommandArg] | None = Field(default=None, min_length=1, max_length=256)
    unit: UnitName | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> BootSource:
        sources = ("kernel", "image", "flake", "command", "unit")
        given = [name for name in sources if getattr(self, name) is not None]
        if len(given) != 1:
            got = " and ".join(given) if given else "none"
            raise refuse(
                "needs exactly one boot source: kernel (with optional initrd, disk and "
                f"cmdline), image, flake, command, or unit; got {got}"
            )
        if self.kernel is None:
            extras = [n for n in ("initrd", "disk", "cmdline") if getattr(self, n) is not None]
            if extras:
                raise refuse(
                    f"{', '.join(extras)} can only be given with kernel, not with {given[0]}"
                )
        return self

    @property
    def kind(self) -> Literal["kernel", "image", "flake", "command", "unit"]:
        """Which boot source this is."""
        if self.kernel is not None:
            return "kernel"
        if self.command is not None:
            return "command"
        if self.unit is not None:
            return "unit"
        return "image" if self.image is not None else "flake"


class RestartPolicy(SpecModel):
    """Restart on the same node, with exponential backoff between attempts."""

    mode: RestartMode = RestartMode.ALWAYS
    backoff_initial_s: BackoffS = 1.0
    backoff_max_s: BackoffS = 300.0

    @model_validator(mode="after")
    def _ordered(self) -> RestartPolicy:
        if self.backoff_max_s < self.backoff_initial_s:
            raise refuse(
                f"must not be smaller than backoff_initial_s ({self.backoff_initial_s}s), "
                f"got {self.backoff_max_s}s",
                subfield="backoff_max_s",
            )
        return self


class VMSpec(SpecModel):
    """A long-lived VM as the user describes it."""

    hypervisor: Hypervisor = Hypervisor.QEMU
    vcpus: int = Field(default=1, ge=1, le=MAX_VCPUS, strict=True)
    memory_mib: MemoryMiB = 512
    boot: BootSource
    volumes: list[Name] = Field(default_factory=list, max_length=32)
    replicas: int = Field(default=1, ge=0, le=MAX_REPLICAS, strict=True)
    placement: Placement = Field(default_factory=Placement)
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    fencing: Fencing = Fencing.STOP
    #: Desired power state: ``vm stop`` sets it false, ``vm start`` true.
    running: bool = True
    #: Bumped by ``vm restart``; an instance restarts when its applied count is lower.
    restart_generation: int = Field(default=0, ge=0, strict=True)
    accel: Accel = Accel.AUTO
    #: A boot that shows no ready line (or, without one, no console output) within
    #: this time is failed, its process killed, and the restart policy applies.
    boot_timeout_s: BootTimeoutS = 60.0
    #: Text whose appearance on the serial console (or process output) means "ready".
    ready_line: str | None = Field(default=None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _process_runs_commands(self) -> VMSpec:
        is_command = self.boot.command is not None
        if self.hypervisor is Hypervisor.PROCESS and not is_command:
            raise refuse(
                f"the process hypervisor runs boot.command; give a command, not {self.boot.kind}",
                subfield="boot",
            )
        if is_command and self.hypervisor is not Hypervisor.PROCESS:
            raise refuse(
                f"boot.command runs only on the process hypervisor, not {self.hypervisor.value}",
                subfield="hypervisor",
            )
        is_unit = self.boot.unit is not None
        if self.hypervisor is Hypervisor.SYSTEMD and not is_unit:
            raise refuse(
                f"the systemd hypervisor runs boot.unit; give a unit, not {self.boot.kind}",
                subfield="boot",
            )
        if is_unit and self.hypervisor is not Hypervisor.SYSTEMD:
            raise refuse(
                f"boot.unit runs only on the systemd hypervisor, not {self.hypervisor.value}",
                subfield="hypervisor",
            )
        return self


class VMPhase(StrEnum):
    """The VM as a whole, summarised from its instances."""

    PENDING = "pending"
    RUNNING = "running"
    DEGRADED = "degraded"
    STOPPED = "stopped"
    FAILED = "failed"


class VMStatus(StatusModel):
    """Written by the replica controller."""

    phase: VMPhase = VMPhase.PENDING
    message: str = ""
    #: Why replicas are where they are, or why some could not be placed.
    placement_reason: str = ""
    ready_replicas: int = 0
    observed_generation: int = 0


class VM(StoredObject):
    """A VM object as stored under ``/blixard/v1/vms/<name>``."""

    STORE_KIND = Kind.VMS

    kind: Literal["VM"] = "VM"
    spec: VMSpec
    status: VMStatus = Field(default_factory=VMStatus)

    @model_validator(mode="after")
    def _name_fits_instances(self) -> VM:
        if len(self.metadata.name) > MAX_VM_NAME:
            raise refuse(
                f"a VM name must be at most {MAX_VM_NAME} characters so that its instance "
                f"names ('<vm>-<index>') stay DNS labels, got {len(self.metadata.name)}",
                subfield="metadata.name",
            )
        return self
