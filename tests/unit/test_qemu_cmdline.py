"""The QEMU command line builder: pure functions, checked flag by flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from blixard.drivers.qemu.cmdline import (
    MACHINE,
    UNIX_PATH_MAX,
    QemuArgs,
    accel_args,
    build_argv,
    host_tsc_khz,
    kernel_append,
    qemu_opt,
    qmp_bind_path,
)


def _args(**overrides: object) -> QemuArgs:
    base: dict[str, object] = {
        "kernel": Path("/img/vmlinux"),
        "initrd": Path("/img/initrd.cpio"),
        "append": "console=ttyS0",
        "accel": "tcg",
        "vcpus": 1,
        "memory_mib": 256,
        "qmp_socket": "/run/vm/qmp.sock",
        "pidfile": Path("/run/vm/qemu.pid"),
        "console_log": Path("/run/vm/console.log"),
    }
    base.update(overrides)
    return QemuArgs(**base)  # type: ignore[arg-type]


def _value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_fast_microvm_settings() -> None:
    argv = build_argv(_args())
    assert argv[0] == "qemu-system-x86_64"
    assert _value(argv, "-M") == MACHINE
    for part in ("microvm", "x-option-roms=off", "pit=off", "pic=off", "rtc=on", "isa-serial=on"):
        assert part in MACHINE.split(",")
    for flag in ("-nodefaults", "-no-user-config", "-nographic", "-no-reboot"):
        assert flag in argv
    # The serial console goes to its own file, apart from QEMU's messages.
    assert _value(argv, "-serial") == "chardev:console"
    assert "file,id=console,path=/run/vm/console.log" in argv
    assert "stdio" not in " ".join(argv)
    assert _value(argv, "-accel") == "tcg,thread=single"
    assert "-cpu" not in argv
    assert _value(argv, "-smp") == "1"
    assert _value(argv, "-m") == "256"
    assert _value(argv, "-kernel") == "/img/vmlinux"
    assert _value(argv, "-initrd") == "/img/initrd.cpio"
    assert _value(argv, "-append") == "console=ttyS0"
    assert _value(argv, "-pidfile") == "/run/vm/qemu.pid"
    assert "-drive" not in argv


def test_qmp_is_a_control_monitor_on_the_socket() -> None:
    argv = build_argv(_args(qmp_socket="/run/a,b/qmp.sock"))
    assert "socket,id=qmp,path=/run/a,,b/qmp.sock,server=on,wait=off" in argv
    assert _value(argv, "-mon") == "chardev=qmp,mode=control"


def test_kvm_uses_host_cpu_and_several_vcpus_multi_threaded_tcg() -> None:
    assert accel_args("kvm", 1) == ["-accel", "kvm", "-cpu", "host"]
    assert accel_args("tcg", 1) == ["-accel", "tcg,thread=single"]
    assert accel_args("tcg", 4) == ["-accel", "tcg,thread=multi"]
    argv = build_argv(_args(accel="kvm", vcpus=2, memory_mib=1024))
    assert _value(argv, "-smp") == "2" and _value(argv, "-m") == "1024"
    assert _value(argv, "-cpu") == "host"


def test_disk_is_virtio_blk_on_mmio_with_escaped_path() -> None:
    argv = build_argv(_args(disk=Path("/d/a,b.img"), disk_format="qcow2"))
    drive = _value(argv, "-drive")
    assert drive.startswith("file=/d/a,,b.img,format=qcow2,if=none,id=disk0")
    assert _value(argv, "-device") == "virtio-blk-device,drive=disk0"


def test_no_initrd_and_name() -> None:
    argv = build_argv(_args(initrd=None, name="web-0", qemu_binary="/opt/qemu"))
    assert "-initrd" not in argv
    assert argv[0] == "/opt/qemu"
    assert _value(argv, "-name") == "web-0"


def test_kernel_append_puts_machine_args_first_and_tsc_only_under_tcg() -> None:
    tcg = kernel_append("tcg", "quiet foo=1", 2_499_998)
    assert tcg == "console=ttyS0 panic=-1 reboot=t tsc_early_khz=2499998 quiet foo=1"
    kvm = kernel_append("kvm", "quiet", 2_499_998)
    assert "tsc_early_khz" not in kvm and kvm.endswith(" quiet")
    assert kernel_append("tcg", "  ", None) == "console=ttyS0 panic=-1 reboot=t"


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        ("processor\t: 0\ncpu MHz\t\t: 2499.998\ncache size\t: 1 KB\n", 2_499_998),
        ("cpu MHz : 3000.000\ncpu MHz : 1200.000\n", 3_000_000),
        ("processor: 0\n", None),
        ("cpu MHz : 0.000\n", None),
    ],
)
def test_host_tsc_khz(cpuinfo: str, expected: int | None) -> None:
    assert host_tsc_khz(cpuinfo) == expected


def test_host_tsc_khz_reads_this_host() -> None:
    khz = host_tsc_khz()
    assert khz is None or 100_000 < khz < 10_000_000


def test_qemu_opt_doubles_commas() -> None:
    assert qemu_opt("a,b,,c") == "a,,b,,,,c"
    assert qemu_opt("plain") == "plain"


def test_qmp_bind_path_is_relative_when_too_long_for_a_unix_socket() -> None:
    short = Path("/var/lib/blixard/runs/web-0")
    assert qmp_bind_path(short) == "/var/lib/blixard/runs/web-0/qmp.sock"
    deep = Path("/" + "d" * UNIX_PATH_MAX)
    assert qmp_bind_path(deep) == "qmp.sock"
