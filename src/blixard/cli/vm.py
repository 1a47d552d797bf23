"""``blixard vm ...``: create, inspect, power and delete VMs through the API.

Lifecycle commands wait by default until the change is observed (see
:mod:`blixard.cli.wait`), because "created" is rarely what a user wants to
know; ``--no-wait`` returns once the API stored the wish.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from blixard.cli.console import out
from blixard.cli.options import (
    ApiOption,
    OutputFormat,
    OutputOption,
    TimeoutOption,
    TokenOption,
    WaitOption,
    failures,
    session,
)
from blixard.cli.output import as_data, print_data, print_vm, vm_table
from blixard.cli.spec import VMFlags, document_from_flags, load_document, name_document
from blixard.cli.wait import Goal, WaitTimeout, settle, wait_for
from blixard.client.http import BlixardClient
from blixard.client.models import VMDetails
from blixard.domain.errors import ValidationError
from blixard.domain.service import owner_of
from blixard.domain.units import parse_duration_s
from blixard.domain.vm import MAX_REPLICAS, VM

vm_app = typer.Typer(help="Create, inspect and control VMs.", no_args_is_help=True)

_SPEC = "VM spec (instead of -f)"
_PLACE = "Placement and failover (instead of -f)"
NameArg = Annotated[str, typer.Argument(help="The VM's name", show_default=False)]


_OBSERVED = {
    Goal.RUNNING: "every replica is running",
    Goal.STOPPED: "no replica is running",
    Goal.RESTARTED: "every replica restarted and is running",
    Goal.SCALED: "the wanted replicas run and the extra ones are gone",
}


def _finish(
    client: BlixardClient,
    vm: VM,
    goal: Goal,
    wait: bool,
    timeout_s: float,
    output: OutputFormat,
    verb: str,
) -> None:
    """Wait for ``goal`` if asked, then print the VM as it is now."""
    name = vm.metadata.name
    if wait:
        try:
            details = wait_for(client, name, goal, timeout_s)
        except WaitTimeout as exc:
            # Say so: a user who thinks the create failed would run it again.
            raise WaitTimeout(
                f"{exc} (the request itself was accepted; `blixard vm status {name}` "
                "shows progress)"
            ) from None
        assert details is not None  # only Goal.GONE ends without the VM
        details = settle(client, details)
        line = f"vm [bold]{name}[/bold] {verb}: {_OBSERVED[goal]}"
    else:
        details = client.get_vm(name)
        line = f"vm [bold]{name}[/bold] {verb} (not waiting for it to take effect)"
    if output is not OutputFormat.TABLE:
        print_data(as_data(details), output)
        return
    out.print(line)
    print_vm(details)


@vm_app.command("create")
def create(
    name: Annotated[
        str | None, typer.Argument(help="The VM's name (optional with -f)", show_default=False)
    ] = None,
    file: Annotated[
        str | None,
        typer.Option(
            "--file", "-f", help="A VM document in YAML or JSON ('-' for stdin)", show_default=False
        ),
    ] = None,
    vcpus: Annotated[int | None, typer.Option(help="Virtual CPUs", rich_help_panel=_SPEC)] = None,
    memory: Annotated[
        str | None, typer.Option(help="Memory with a unit, e.g. 512M, 2G", rich_help_panel=_SPEC)
    ] = None,
    kernel: Annotated[
        str | None, typer.Option(help="Guest kernel file on the node", rich_help_panel=_SPEC)
    ] = None,
    initrd: Annotated[
        str | None, typer.Option(help="Initramfs file (with --kernel)", rich_help_panel=_SPEC)
    ] = None,
    disk: Annotated[
        str | None, typer.Option(help="Raw disk image (with --kernel)", rich_help_panel=_SPEC)
    ] = None,
    cmdline: Annotated[
        str | None, typer.Option(help="Kernel command line (with --kernel)", rich_help_panel=_SPEC)
    ] = None,
    image: Annotated[
        str | None, typer.Option(help="A guest image built on the node", rich_help_panel=_SPEC)
    ] = None,
    command: Annotated[
        str | None,
        typer.Option(
            help="Run this command line instead of a guest (shell-like quoting; "
            "implies --driver process)",
            rich_help_panel=_SPEC,
        ),
    ] = None,
    driver: Annotated[
        str | None,
        typer.Option(help="qemu or process (default: qemu)", rich_help_panel=_SPEC),
    ] = None,
    replicas: Annotated[
        int | None, typer.Option(help="Number of replicas (default: 1)", rich_help_panel=_SPEC)
    ] = None,
    ready_line: Annotated[
        str | None,
        typer.Option(help="Console text that means the VM is ready", rich_help_panel=_SPEC),
    ] = None,
    boot_timeout: Annotated[
        str | None,
        typer.Option(help="Time allowed to become ready (default: 60s)", rich_help_panel=_SPEC),
    ] = None,
    accel: Annotated[
        str | None, typer.Option(help="auto, kvm or tcg (default: auto)", rich_help_panel=_SPEC)
    ] = None,
    node_selector: Annotated[
        str | None,
        typer.Option(help="Only nodes with these labels: disk=ssd,zone=a", rich_help_panel=_PLACE),
    ] = None,
    constraint: Annotated[
        str | None,
        typer.Option(
            help="Hard rules on node labels and capacity: storage=nvme,memory>=32G",
            rich_help_panel=_PLACE,
        ),
    ] = None,
    anti_affinity: Annotated[
        str | None,
        typer.Option(
            help="Groups whose members never share a node (comma-separated)",
            rich_help_panel=_PLACE,
        ),
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            help="best-fit, spread, data-locality, network-proximity, specialization",
            rich_help_panel=_PLACE,
        ),
    ] = None,
    fencing: Annotated[
        str | None,
        typer.Option(
            help="When its node loses the cluster: stop (default), pause or none (never "
            "failed over)",
            rich_help_panel=_PLACE,
        ),
    ] = None,
    wait: WaitOption = True,
    timeout: TimeoutOption = "120s",
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Create a VM from flags or from a document (-f), and wait until it runs."""
    flags = VMFlags(
        vcpus=vcpus,
        memory=memory,
        kernel=kernel,
        initrd=initrd,
        disk=disk,
        cmdline=cmdline,
        image=image,
        command=command,
        driver=driver,
        replicas=replicas,
        ready_line=ready_line,
        boot_timeout=boot_timeout,
        accel=accel,
        node_selector=node_selector,
        constraint=constraint,
        anti_affinity=anti_affinity,
        strategy=strategy,
        fencing=fencing,
    )
    with failures():
        timeout_s = parse_duration_s(timeout, "--timeout")  # refused before anything is created
        if file is not None:
            if flags.given():
                raise ValidationError(
                    "-f",
                    f"cannot be combined with {', '.join(flags.given())}; put those in the file",
                )
            document = name_document(load_document(file), name, file)
        elif name is None:
            raise ValidationError("NAME", "is required (or give the VM as a document with -f)")
        else:
            document = document_from_flags(name, flags)
        with session(api, token) as client:
            vm = client.create_vm(document)
            goal = Goal.RUNNING if vm.spec.running else Goal.STOPPED
            _finish(client, vm, goal, wait, timeout_s, output, "created")


def _lifecycle(
    name: str,
    action: str,
    goal: Goal,
    *,
    wait: bool,
    timeout: str,
    output: OutputFormat,
    api: str | None,
    token: str | None,
) -> None:
    """start/stop/restart: one API call, then wait and print as ``_finish`` does."""
    with failures():
        timeout_s = parse_duration_s(timeout, "--timeout")
        with session(api, token) as client:
            calls = {"start": client.start_vm, "stop": client.stop_vm, "restart": client.restart_vm}
            vm = calls[action](name)
            verb = {"start": "started", "stop": "stopped", "restart": "restarted"}[action]
            _finish(client, vm, goal, wait, timeout_s, output, verb)


@vm_app.command("start")
def start(
    name: NameArg,
    wait: WaitOption = True,
    timeout: TimeoutOption = "120s",
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Run a stopped VM, and wait until its replicas run."""
    _lifecycle(
        name, "start", Goal.RUNNING, wait=wait, timeout=timeout, output=output, api=api, token=token
    )


@vm_app.command("stop")
def stop(
    name: NameArg,
    wait: WaitOption = True,
    timeout: TimeoutOption = "120s",
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Stop a VM (it stays defined), and wait until no replica runs."""
    _lifecycle(
        name, "stop", Goal.STOPPED, wait=wait, timeout=timeout, output=output, api=api, token=token
    )


@vm_app.command("restart")
def restart(
    name: NameArg,
    wait: WaitOption = True,
    timeout: TimeoutOption = "120s",
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Restart every replica, and wait until each runs again."""
    _lifecycle(
        name,
        "restart",
        Goal.RESTARTED,
        wait=wait,
        timeout=timeout,
        output=output,
        api=api,
        token=token,
    )


@vm_app.command("scale")
def scale(
    name: NameArg,
    replicas: Annotated[
        int, typer.Option("--replicas", "-r", help="How many replicas to run (0-1000)")
    ],
    wait: WaitOption = True,
    timeout: TimeoutOption = "120s",
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Set the number of replicas; new ones are placed by the scheduler, extra ones
    (highest index first) are stopped and then removed."""
    with failures():
        timeout_s = parse_duration_s(timeout, "--timeout")
        if not 0 <= replicas <= MAX_REPLICAS:
            raise ValidationError("--replicas", f"must be 0-{MAX_REPLICAS}, got {replicas}")
        with session(api, token) as client:
            vm = client.scale_vm(name, replicas)
            _finish(client, vm, Goal.SCALED, wait, timeout_s, output, f"scaled to {replicas}")


@vm_app.command("delete")
def delete(
    name: NameArg,
    wait: WaitOption = True,
    timeout: TimeoutOption = "120s",
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Delete a VM, and wait until its replicas are gone."""
    with failures():
        timeout_s = parse_duration_s(timeout, "--timeout")
        with session(api, token) as client:
            vm = client.delete_vm(name)
            if wait:
                wait_for(client, name, Goal.GONE, timeout_s)
            if output is not OutputFormat.TABLE:
                print_data(as_data(vm), output)
                return
            tail = "and its instances are gone" if wait else "(instances are removed next)"
            out.print(f"vm [bold]{name}[/bold] deleted {tail}")


@vm_app.command("status")
def status(
    name: NameArg,
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Show a VM and its instances."""
    with failures(), session(api, token) as client:
        details = client.get_vm(name)
        if output is OutputFormat.TABLE:
            print_vm(details)
        else:
            print_data(as_data(details), output)


@vm_app.command("list")
def list_vms(
    all_: Annotated[
        bool,
        typer.Option("--all", help="Also list the VMs that run services' units"),
    ] = False,
    output: OutputOption = OutputFormat.TABLE,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """List VMs (those that run services' units only with --all: `service list` shows them)."""
    with failures(), session(api, token) as client:
        items: list[VMDetails] = client.list_vms()
        shown = items if all_ else [d for d in items if owner_of(d.vm) is None]
        hidden = len(items) - len(shown)
        if output is not OutputFormat.TABLE:
            print_data(as_data(shown), output)
            return
        if shown:
            out.print(vm_table(shown))
        else:
            out.print("No VMs.")
        if hidden:
            out.print(f"({hidden} VMs of services not shown: --all shows them)")


@vm_app.command("logs")
def logs(
    name: NameArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new output")
    ] = False,
    replica: Annotated[int, typer.Option(help="Which replica", min=0)] = 0,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Print a replica's console or process output."""
    with failures(), session(api, token) as client:
        stream = sys.stdout.buffer
        try:
            for chunk in client.logs(name, replica=replica, follow=follow):
                stream.write(chunk)
                stream.flush()
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
