"""The QEMU command line: pure functions, no I/O beyond reading the host TSC rate.

The settings are the fastest reliable ones measured on these hosts
(shared/vmlab, QEMU 7.2 ``microvm``):

* ``-M microvm`` without option ROMs, PIT or PIC (-0.1 s), with ``rtc=on``
  (without an RTC the kernel waits ~2 s for the time) and the ISA serial port
  (the console). ACPI stays on: the kernel finds virtio-mmio devices only
  through ACPI, and the power button (``system_powerdown``) is an ACPI event.
* ``-nodefaults -no-user-config -nographic``: no stray devices. The serial
  console is a ``file`` chardev (``console.log``), kept apart from QEMU's own
  stdout/stderr (which the executor logs): QEMU's error messages must never
  pass for guest output, e.g. as the "first output" that means ready.
* ``-no-reboot`` with the guest's ``panic=-1 reboot=t``: a guest reboot or
  panic ends QEMU, so the driver sees the exit instead of a boot loop.
* Under TCG, ``tsc_early_khz=<host TSC kHz>``: TCG's RDTSC reads the host's
  TSC, and without the rate the kernel calibrates against the emulated PIT,
  which fails about one boot in ten and then hangs silently forever.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

AccelName = Literal["tcg", "kvm"]

MACHINE = "microvm,x-option-roms=off,pit=off,pic=off,rtc=on,isa-serial=on"

#: Arguments the machine needs whatever the guest (see the module docstring).
MACHINE_KERNEL_ARGS = ("console=ttyS0", "panic=-1", "reboot=t")

#: Longest path ``sun_path`` takes (108 bytes with its NUL).
UNIX_PATH_MAX = 107


def host_tsc_khz(cpuinfo: str | None = None) -> int | None:
    """The host's TSC rate in kHz from /proc/cpuinfo's "cpu MHz" (None if unknown).

    That field is the TSC rate on the constant-TSC x86 hosts QEMU runs on; a
    wrong value would only skew the guest's early clock, while no value at
    all risks the calibration hang.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo, re.MULTILINE)
    if match is None:
        return None
    khz = round(float(match.group(1)) * 1000)
    return khz if khz > 0 else None


def kernel_append(accel: AccelName, guest_args: str, tsc_khz: int | None) -> str:
    """The kernel command line: the machine's arguments, then the guest's own.

    The guest's arguments come last so that, for the parameters where the
    kernel takes the last value, a user's ``cmdline`` wins.
    """
    args = list(MACHINE_KERNEL_ARGS)
    if accel == "tcg" and tsc_khz:
        args.append(f"tsc_early_khz={tsc_khz}")
    if guest_args.strip():
        args.append(guest_args.strip())
    return " ".join(args)


def qemu_opt(value: str) -> str:
    """Escape a value inside a QEMU ``key=value,...`` option (commas are doubled)."""
    return value.replace(",", ",,")


@dataclass(frozen=True, slots=True)
class QemuArgs:
    """What one VM's QEMU process needs; :func:`build_argv` renders it."""

    kernel: Path
    append: str
    accel: AccelName
    vcpus: int
    memory_mib: int
    #: QMP socket as QEMU should bind it (relative to the run dir when the
    #: absolute path is too long for a unix socket).
    qmp_socket: str
    pidfile: Path
    console_log: Path
    initrd: Path | None = None
    disk: Path | None = None
    disk_format: Literal["raw", "qcow2"] = "raw"
    qemu_binary: str = "qemu-system-x86_64"
    name: str | None = None
    extra: Sequence[str] = field(default_factory=tuple)


def accel_args(accel: AccelName, vcpus: int) -> list[str]:
    """``-accel`` (and ``-cpu``) for the chosen accelerator.

    KVM uses ``-cpu host`` (the host's features, the normal KVM setting).
    TCG keeps QEMU's default CPU model and runs one translation thread for a
    single vCPU (no gain from more); several vCPUs get multi-threaded TCG.
    """
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=single" if vcpus == 1 else "tcg,thread=multi"]


def build_argv(args: QemuArgs) -> list[str]:
    """The full argv of the QEMU process."""
    argv = [args.qemu_binary]
    if args.name:
        argv += ["-name", qemu_opt(args.name)]
    argv += ["-M", MACHINE, *accel_args(args.accel, args.vcpus)]
    argv += ["-smp", str(args.vcpus), "-m", str(args.memory_mib)]
    argv += ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]
    argv += [
        "-chardev",
        f"file,id=console,path={qemu_opt(str(args.console_log))}",
        "-serial",
        "chardev:console",
    ]
    argv += ["-kernel", str(args.kernel)]
    if args.initrd is not None:
        argv += ["-initrd", str(args.initrd)]
    argv += ["-append", args.append]
    argv += [
        "-chardev",
        f"socket,id=qmp,path={qemu_opt(args.qmp_socket)},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    argv += ["-pidfile", str(args.pidfile)]
    if args.disk is not None:
        argv += [
            "-drive",
            f"file={qemu_opt(str(args.disk))},format={args.disk_format},if=none,id=disk0,"
            "cache=writeback",
            "-device",
            "virtio-blk-device,drive=disk0",
        ]
    argv += list(args.extra)
    return argv


def qmp_bind_path(run_dir: Path, name: str = "qmp.sock") -> str:
    """The QMP path to give QEMU: absolute if it fits a unix socket, else relative.

    QEMU runs with the run directory as its working directory, so the short
    relative name always binds; clients reach a long path through a directory
    descriptor (see :mod:`blixard.drivers.qemu.qmp`).
    """
    full = str(run_dir / name)
    return full if len(full.encode()) <= UNIX_PATH_MAX else name
