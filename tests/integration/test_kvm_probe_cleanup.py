"""A KVM probe's QEMU never outlives the process that started it, even one killed by SIGKILL.

Under an unusable KVM (these machines) a probe guest spins a core until it
is killed; an orphaned probe once slowed a whole test run to a crawl. The
real QEMU may or may not die on its own when its output pipe breaks, so this
uses a ``fake_qemu`` that prints nothing and sleeps: only the parent-death
signal can end it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.images import session_image

FAKE_QEMU = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "QEMU emulator version 7.2.0 (fake_qemu)"; exit 0; fi
echo $$ > "{pidfile}"
trap '' PIPE
exec sleep 300
"""

CHILD = """
import asyncio, sys
from pathlib import Path
from blixard.drivers.qemu import AccelProbe
cache, images, fake, device = map(Path, sys.argv[1:5])
probe = AccelProbe(cache, images, qemu_binary=str(fake), kvm_device=device, timeout_s=120)
asyncio.run(probe.probe())
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_probe_qemu_dies_with_a_sigkilled_parent(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    image = session_image(tmp_path_factory)
    pidfile = tmp_path / "fake_qemu.pid"
    fake = tmp_path / "fake_qemu"
    fake.write_text(FAKE_QEMU.format(pidfile=pidfile))
    fake.chmod(0o755)
    device = tmp_path / "fake-kvm"  # stands in for /dev/kvm: exists, read-write
    device.write_text("")
    parent = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "probe.json"), str(image.path.parent),
         str(fake), str(device)],
    )  # fmt: skip
    qemu_pid = 0
    try:
        deadline = time.monotonic() + 30
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        qemu_pid = int(pidfile.read_text())
        time.sleep(0.5)
        assert alive(qemu_pid)  # the probe is running while its parent lives
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 3
    while alive(qemu_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert not alive(qemu_pid), "the probe's QEMU outlived its SIGKILLed parent"
    finally:
        if alive(qemu_pid):
            os.kill(qemu_pid, signal.SIGKILL)
