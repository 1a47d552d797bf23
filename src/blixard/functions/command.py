"""The ``command`` runtime: any executable, event JSON on stdin, response JSON on stdout.

Every invocation gets a fresh process (pre-spawned, see
:mod:`blixard.functions.processes`) so handlers need no request loop and
cannot leak state between invocations. The handler sees only the event: a
pre-spawned process was started before the request existed, and the design
gives commands "the event on stdin", nothing else. Its environment is not
the daemon's (which may hold tokens): PATH, a locale, a private HOME and
TMPDIR, ``BLIXARD_FUNCTION``, and the function's ``env``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from blixard.domain.errors import ValidationError
from blixard.domain.function import FunctionSpec
from blixard.functions.processes import (
    Launch,
    ProcessWorker,
    base_env,
    describe_exit,
    tail_text,
)
from blixard.functions.runtime import HandlerFailed, Worker

#: start_worker waits at most this long for the first process to be up (blocked on
#: its stdin) so that a handler that cannot start fails the cold start, not later.
SETTLE_S = 10.0


def resolve_executable(spec: FunctionSpec) -> str:
    """The absolute path of ``spec.handler``: an absolute path, or a name on PATH.

    PATH is the function's own ``env["PATH"]`` when it sets one (that is what
    the handler will run with), else the daemon's. Raises ValidationError
    naming ``handler``.
    """
    handler = spec.handler
    if "/" in handler:
        if not handler.startswith("/"):
            raise ValidationError(
                "handler",
                f"must be an absolute path or a name found on PATH, got {handler!r} "
                "(a relative path has no meaning on the node that runs it)",
            )
        path = Path(handler)
        if not path.exists():
            raise ValidationError("handler", f"{handler} does not exist")
        if not path.is_file():
            raise ValidationError("handler", f"{handler} is not a file")
        if not os.access(path, os.X_OK):
            raise ValidationError("handler", f"{handler} is not executable (chmod +x)")
        return handler
    search = spec.env.get("PATH", os.environ.get("PATH", os.defpath))
    found = shutil.which(handler, path=search)
    if found is None:
        raise ValidationError("handler", f"no executable {handler!r} on PATH ({search})")
    return os.path.abspath(found)


def _encode(event: bytes, context: dict[str, Any]) -> bytes:
    return event


def command_failure(returncode: int, stderr_tail: bytes) -> HandlerFailed:
    """'the handler exited with status 3: <its last stderr line>', the stderr tail as detail."""
    detail = tail_text(stderr_tail)
    last = detail.splitlines()[-1] if detail else ""
    message = f"the handler {describe_exit(returncode)}"
    return HandlerFailed(f"{message}: {last}" if last else message, detail=detail)


class CommandRuntime:
    """Runtime ``command`` (see the module docstring)."""

    name = "command"

    def __init__(self, *, settle_s: float = SETTLE_S, spares: int = 1) -> None:
        self.settle_s = settle_s
        self.spares = spares

    async def check(self, spec: FunctionSpec) -> None:
        resolve_executable(spec)

    async def start_worker(self, name: str, spec: FunctionSpec, work_dir: Path) -> Worker:
        try:
            program = resolve_executable(spec)
        except ValidationError as exc:
            raise HandlerFailed(f"cannot start the handler: {exc.reason}") from None
        launch = Launch(
            argv=(program, *spec.args),
            env=base_env(work_dir, spec.env, BLIXARD_FUNCTION=name),
            cwd=work_dir,
            program=program,
        )
        worker = ProcessWorker(
            launch,
            concurrency=spec.target_concurrency,
            encode=_encode,
            failure=command_failure,
            spares=self.spares,
        )
        await worker.start(min(spec.timeout_s, self.settle_s))
        return worker
