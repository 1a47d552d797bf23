"""The function guest: an initramfs whose ``/init`` is the guest agent of the ``microvm`` runtime.

The agent is busybox ``ash`` (the only userland the guest has) serving one
virtio-serial port named ``rpc`` (``/dev/vportNpM``, found through
``/sys/class/virtio-ports/*/name`` since there is no udev). The host side is
:mod:`blixard.functions.microvm.agent`; the protocol is line headers with
byte counts, so events and outputs may hold any bytes:

* agent -> host once booted: ``READY <version>``.
* ``PING`` -> ``PONG`` (shell builtins only: the template's last words).
* ``INSTALL <n> <mode> <epoch|-> <hex>`` + n bytes: the handler script
  (written by the host: env exports, ``set --`` args, then ``spec.handler``).
  The agent mixes the host's random hex into ``/dev/urandom``; given an epoch
  (the host sends one once after a restore from a template) it also forces
  the kernel's CRNG to reseed from that pool (``/bin/reseed-crng``, below:
  every clone starts with the template's CRNG state and would otherwise hand
  out the same "random" bytes until its next scheduled reseed) and sets the
  clock (a clone believes it is still the moment the template was saved).
  Answer ``INSTALLED``.
* ``RUN <request id> <n> <mode> <limit>`` + n bytes of event: the handler
  script is sourced by ``sh`` in a subshell with the event on stdin and
  ``BLIXARD_REQUEST_ID`` exported; stdout and stderr go to a size-capped
  tmpfs. Answer ``DONE <exit> <stdout size> <stdout bytes sent> <stderr bytes
  sent>``, then those stdout bytes (none if the output is larger than
  ``limit``), then the last 4 KiB of stderr when the exit status is not 0.

``mode`` says how the agent reads a payload: ``r`` with the shell's own
``read -d '' -n`` (no fork, but one syscall per byte: the host picks it for
payloads up to 1 KiB without NUL), ``h`` with ``head -c`` (any bytes).

Few forks per invocation on purpose: under TCG a fork costs ~5 ms and a
fork+exec ~13 ms here, so a warm invocation forks once (the handler's
subshell) when payload and output are short: sizes come from the offset of
the stdout file (``/proc/$$/fdinfo``), short texts move with ``read``/``printf``.
``head -c`` may buffer past its count, so the host never sends ahead of an answer.
The agent never kills a handler: the host enforces timeouts by discarding
the whole VM, which also ends anything the handler left running.
"""

from __future__ import annotations

import struct

#: Protocol version, announced in ``READY`` and stored in the image manifest.
AGENT_VERSION = "blixard-function-agent/1"

#: Printed on the serial console when the agent starts serving (for humans and logs).
AGENT_READY_LINE = "blixard-agent: ready"

#: Only the virtio-mmio transport and virtio-console: no power button (the host
#: kills function VMs outright), no disk, no network. Each module costs boot time.
AGENT_MODULES: tuple[str, ...] = (
    "kernel/drivers/virtio/virtio_mmio.ko",
    "kernel/drivers/char/virtio_console.ko",
)

#: Added to the image's kernel arguments: a function VM runs one function, so
#: the guest kernel's Spectre mitigations guard the tenant against itself,
#: while under TCG they cost ~15-20 % of a warm invocation (measured here).
#: The isolation that matters is the VM boundary, which this does not touch.
AGENT_EXTRA_CMDLINE = "mitigations=off"

#: Size cap of the tmpfs holding one invocation's event, stdout and stderr: a
#: runaway handler fills it (and gets ENOSPC) instead of the guest's memory.
IO_TMPFS_MIB = 16

AGENT_SETUP = """#!/bin/sh
# Blixard function guest agent (busybox ash): see blixard/images/function_agent.py.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run/fn /run/io /tmp
mount -t tmpfs -o size=%(io_mib)dm,mode=0700 tmpfs /run/io
for m in $(cat /etc/modules); do
    insmod "/lib/modules/$m" || echo "blixard-agent: insmod $m failed"
done
port=
i=0
while [ -z "$port" ] && [ $i -lt 500 ]; do
    for p in /sys/class/virtio-ports/*; do
        [ -r "$p/name" ] && read -r n < "$p/name" && [ "$n" = rpc ] && port=/dev/${p##*/}
    done
    [ -n "$port" ] || { sleep 0.01; i=$((i+1)); }
done
[ -n "$port" ] || { echo "blixard-agent: no virtio-serial port named rpc"; poweroff -f; }
i=0
while [ ! -e "$port" ] && [ $i -lt 200 ]; do sleep 0.01; i=$((i+1)); done
exec 3<>"$port"
fn=/run/fn io=/run/io rnd=/dev/urandom
echo "%(ready)s"
"""

#: The serving loop, on fd 3, with ``$fn`` (handler dir), ``$io`` (tmpfs) and
#: ``$rnd`` (the entropy sink) set: kept apart so tests run it on the host.
AGENT_LOOP = """
# recv N MODE FILE: the next N bytes of the port into FILE. MODE r: the shell's
# own read (no fork; the host uses it for short payloads without NUL), h: head -c.
recv() {
    if [ "$1" -eq 0 ]; then
        : > "$3"
    elif [ "$2" = r ]; then
        IFS= read -r -d '' -n "$1" v <&3
        printf %%s "$v" > "$3"
    else
        head -c "$1" <&3 > "$3"
    fi
}
echo "READY %(version)s" >&3
while true; do
    # A read gives EOF while no host is connected: wait and retry.
    if ! read -r cmd a b c d <&3; then sleep 0.01; continue; fi
    case "$cmd" in
    PING) echo PONG >&3 ;;
    INSTALL)
        recv "$a" "$b" "$fn/handler.sh"
        echo "$d" > "$rnd"
        [ "$c" = - ] || { reseed-crng; date -s "@$c" > /dev/null 2>&1; }
        echo INSTALLED >&3 ;;
    RUN)
        recv "$b" "$c" "$io/in"
        exec 4> "$io/out" 5> "$io/err"
        ( BLIXARD_REQUEST_ID=$a; export BLIXARD_REQUEST_ID; . "$fn/handler.sh" ) \\
            < "$io/in" >&4 2>&5 3>&- 4>&- 5>&-
        rc=$?
        # Bytes written = the offset of the stdout file we share with the handler: no fork.
        read -r k n < /proc/$$/fdinfo/4
        exec 4>&- 5>&-
        s=$n
        [ "$n" -gt "$d" ] && s=0
        e=0
        if [ "$rc" -ne 0 ]; then
            exec 6> "$io/tail"
            tail -c 4096 "$io/err" >&6
            read -r k e < /proc/$$/fdinfo/6
            exec 6>&-
        fi
        v=
        [ "$s" -gt 0 ] && [ "$s" -le 1024 ] && IFS= read -r -d '' -n "$s" v < "$io/out"
        echo "DONE $rc $n $s $e" >&3
        if [ "$s" -gt 0 ]; then
            if [ "${#v}" -eq "$s" ]; then printf %%s "$v" >&3; else head -c "$s" "$io/out" >&3; fi
        fi
        [ "$e" -gt 0 ] && head -c "$e" "$io/tail" >&3 ;;
    *) echo "ERR unknown command" >&3 ;;
    esac
done
"""


#: Path of the reseed helper in the guest.
RESEED_PATH = "bin/reseed-crng"


def reseed_crng_elf() -> bytes:
    """A 178-byte static x86-64 program: ``ioctl(open("/dev/urandom"), RNDRESEEDCRNG)``.

    Why hand-assembled: busybox has no way to issue that ioctl, writing to
    /dev/urandom only mixes bytes in without reseeding, the guest kernel has
    no VMGENID driver, and building images must not need a compiler. Exit
    status is the ioctl's errno (0 on success). The bytes are, in order:
    ``mov eax,2; lea rdi,[rip+path]; xor esi,esi; xor edx,edx; syscall``
    (open), ``mov edi,eax; mov eax,16; mov esi,0x5207; xor edx,edx; syscall``
    (ioctl RNDRESEEDCRNG = _IO('R', 7)), ``mov edi,eax; neg edi; mov eax,60;
    syscall`` (exit), then the path.
    """
    base, headers = 0x400000, 64 + 56
    code = bytearray(
        b"\xb8\x02\x00\x00\x00"  # mov eax, 2 (open)
        b"\x48\x8d\x3d\x00\x00\x00\x00"  # lea rdi, [rip + disp32], patched below
        b"\x31\xf6\x31\xd2\x0f\x05"  # xor esi, esi; xor edx, edx; syscall
        b"\x89\xc7\xb8\x10\x00\x00\x00"  # mov edi, eax; mov eax, 16 (ioctl)
        b"\xbe\x07\x52\x00\x00\x31\xd2\x0f\x05"  # mov esi, 0x5207; xor edx, edx; syscall
        b"\x89\xc7\xf7\xdf"  # mov edi, eax; neg edi
        b"\xb8\x3c\x00\x00\x00\x0f\x05"  # mov eax, 60 (exit); syscall
    )
    code[8:12] = struct.pack("<i", len(code) - 12)  # path follows the code; rip = after lea
    body = bytes(code) + b"/dev/urandom\x00"
    size = headers + len(body)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, SysV
    ehdr = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, base + headers, 64, 0, 0, 64, 56, 1, 0, 0, 0
    )
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)  # PT_LOAD, R+X
    return ehdr + phdr + body


def agent_loop_script() -> str:
    """The serving loop alone (see :data:`AGENT_LOOP`)."""
    return AGENT_LOOP % {"version": AGENT_VERSION}


def agent_init_script(ready_line: str = AGENT_READY_LINE) -> str:
    """The agent's ``/init`` text."""
    setup = AGENT_SETUP % {"ready": ready_line, "io_mib": IO_TMPFS_MIB}
    return setup + agent_loop_script()
