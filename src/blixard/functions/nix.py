"""The ``nix`` runtime: a handler is a Nix expression ``{ event, context }: { statusCode; body; }``.

Each invocation is one ``nix-instantiate --eval --strict --json`` process,
pre-spawned (see :mod:`blixard.functions.processes`): it imports the handler
and forces it (so parsing is done before the event arrives), then blocks
reading ``{"event": ..., "context": ...}`` from stdin. Event and context
travel together on stdin because the context (the request id) does not exist
yet when the process is spawned. ``nix-instantiate`` cannot evaluate more
than one expression per process (there is no evaluator server in Nix 2.8),
so the per-invocation exec is unavoidable; pre-spawning takes it (about
35 ms here) off the request path, and the answer is taken as soon as the
JSON document is complete, not after the exit (about 3 ms more).

Evaluation is kept off the network and off the machine's Nix state: the
``dummy://`` store (no database, no daemon, nothing written under
/nix/var; store paths are still computed for ``"${./file}"`` and
derivations), a private HOME, XDG directories and NIX_CONF_DIR under the
worker's directory (no system or user nix.conf, hence no plugins or
substituters), fetchers pointed at a closed local proxy with one download
attempt, and git limited to local repositories. ``restrict-eval`` and
``pure-eval`` are not used: they forbid reading /dev/stdin, which is how
the event gets in. A handler can still read local files, like a
``command`` handler can.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from blixard.domain.errors import ValidationError
from blixard.domain.function import FunctionSpec
from blixard.functions.processes import (
    Launch,
    Proc,
    ProcessWorker,
    base_env,
    describe_exit,
    tail_text,
)
from blixard.functions.runtime import HandlerFailed, HandlerTimeout, Worker

#: How long check() lets ``nix-instantiate`` take to load the handler.
CHECK_TIMEOUT_S = 10.0
SETTLE_S = 10.0
HANDLER_FILE = "handler.nix"

#: Common flags: evaluate to JSON, no store, no build users (that warning is noise).
NIX_FLAGS: tuple[str, ...] = (
    "--eval",
    "--strict",
    "--json",
    "--store",
    "dummy://",
    "--option",
    "build-users-group",
    "",
    "--option",
    "download-attempts",
    "1",
    "--option",
    "substituters",
    "",
)
#: Where fetchers (curl) are sent: a local port nobody listens on.
_CLOSED_PROXY = "http://127.0.0.1:9"

_NOISE = (
    re.compile(r"^warning: the group '.*' specified in 'build-users-group' does not exist$"),
    re.compile(r"^\(use '--show-trace' to show detailed location information\)$"),
)


def nix_string(text: str) -> str:
    """``text`` as a Nix string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def is_path_handler(handler: str) -> bool:
    """A handler naming a ``.nix`` file rather than holding an expression."""
    text = handler.strip()
    return text.endswith(".nix") and "\n" not in text and not any(c in text for c in "{}:;= ")


def wrapper_expression(handler_file: Path) -> str:
    """What each process evaluates: load the handler first, then read event and context."""
    return (
        f"let handler = import {nix_string(str(handler_file))}; "
        'input = builtins.fromJSON (builtins.readFile "/dev/stdin"); '
        "in builtins.seq handler (handler { inherit (input) event context; })"
    )


def clean_error(stderr: str, handler_file: Path | None, shown_as: str) -> str:
    """nix's error text without its noise, the handler's private path shown as ``shown_as``."""
    lines = [ln for ln in stderr.splitlines() if not any(p.match(ln.strip()) for p in _NOISE)]
    text = "\n".join(lines).strip()
    if handler_file is not None:
        text = text.replace(str(handler_file), shown_as)
    return text


def summary(error: str) -> str:
    """The first line of an error: ``error: attribute 'type' missing``."""
    for line in error.splitlines():
        if line.strip():
            return line.strip().removeprefix("error: ")
    return ""


def nix_env(work_dir: Path, extra: dict[str, str]) -> dict[str, str]:
    """The environment of nix-instantiate: private dirs, offline (see the module docstring)."""
    dirs = {
        name: work_dir / sub
        for name, sub in (
            ("XDG_CACHE_HOME", "cache"),
            ("XDG_CONFIG_HOME", "config"),
            ("XDG_DATA_HOME", "data"),
            ("XDG_STATE_HOME", "state"),
            ("NIX_CONF_DIR", "etc"),
        )
    }
    for path in dirs.values():
        path.mkdir(mode=0o700, exist_ok=True)
    return base_env(
        work_dir,
        extra,
        **{name: str(path) for name, path in dirs.items()},
        NIX_USER_CONF_FILES=str(work_dir / "etc" / "nix.conf"),
        NIX_REMOTE="",
        http_proxy=_CLOSED_PROXY,
        https_proxy=_CLOSED_PROXY,
        all_proxy=_CLOSED_PROXY,
        HTTPS_PROXY=_CLOSED_PROXY,
        ALL_PROXY=_CLOSED_PROXY,
        GIT_ALLOW_PROTOCOL="file",
    )


def encode_input(event: bytes, context: dict[str, Any]) -> bytes:
    """``{"event": <event>, "context": <context>}`` for the wrapper expression.

    An empty event is ``null``; an event that is not JSON (a raw HTTP body) is
    passed as a string, so a stray byte cannot splice itself into the context.
    """
    raw = event.strip()
    if not raw:
        raw = b"null"
    else:
        try:
            json.loads(raw)
        except ValueError:
            raw = json.dumps(event.decode(errors="replace")).encode()
    ctx = json.dumps(context, separators=(",", ":")).encode()
    return b'{"event":' + raw + b',"context":' + ctx + b"}"


class NixRuntime:
    """Runtime ``nix`` (see the module docstring)."""

    name = "nix"

    def __init__(
        self,
        nix_instantiate: str = "nix-instantiate",
        *,
        settle_s: float = SETTLE_S,
        check_timeout_s: float = CHECK_TIMEOUT_S,
        spares: int = 1,
    ) -> None:
        self.nix_instantiate = nix_instantiate
        self.settle_s = settle_s
        self.check_timeout_s = check_timeout_s
        self.spares = spares

    def _binary(self) -> str:
        found = shutil.which(self.nix_instantiate)
        if found is None:
            raise HandlerFailed(f"{self.nix_instantiate} is not installed on this node")
        return os.path.abspath(found)

    async def check(self, spec: FunctionSpec) -> None:
        """Load the handler once (parse it and evaluate it to a value): it must be a function.

        No event is given: ``import`` evaluates the expression only as far as
        its top (a lambda), so the handler's body does not run.
        """
        handler = spec.handler
        if is_path_handler(handler):
            path = Path(handler.strip())
            if not path.is_absolute():
                raise ValidationError("handler", f"a .nix file must be an absolute path: {handler}")
            if not path.is_file():
                raise ValidationError("handler", f"{path} does not exist")
        try:
            binary = self._binary()
        except HandlerFailed as exc:
            raise ValidationError("handler", str(exc)) from None
        with tempfile.TemporaryDirectory(prefix="blixard-nix-check-") as tmp:
            work = Path(tmp)
            handler_file, shown = _handler_file(spec, work)
            expr = f"builtins.typeOf (import {nix_string(str(handler_file))})"
            launch = Launch(
                argv=(binary, *NIX_FLAGS, "--expr", expr),
                env=nix_env(work, spec.env),
                cwd=work,
                program=binary,
            )
            proc = Proc.spawn(launch)
            try:
                outcome = await proc.run(b"", self.check_timeout_s, early_json=False)
            except HandlerTimeout:
                raise ValidationError(
                    "handler", f"Nix did not load it within {self.check_timeout_s:g}s"
                ) from None
            except HandlerFailed as exc:
                raise ValidationError("handler", str(exc)) from None
            finally:
                await proc.destroy()
        if outcome.returncode != 0:
            error = clean_error(tail_text(outcome.stderr_tail), handler_file, shown)
            raise ValidationError(
                "handler", error or f"nix-instantiate {describe_exit(outcome.returncode or 0)}"
            )
        kind = json.loads(outcome.stdout or b'""')
        if kind != "lambda":
            raise ValidationError(
                "handler",
                "must be a function such as { event, context }: { statusCode = 200; body = ...; }"
                f", but it is a {kind}",
            )

    async def start_worker(self, name: str, spec: FunctionSpec, work_dir: Path) -> Worker:
        binary = self._binary()
        handler_file, shown = _handler_file(spec, work_dir)

        def failure(returncode: int, stderr_tail: bytes) -> HandlerFailed:
            error = clean_error(tail_text(stderr_tail), handler_file, shown)
            if not error:
                return HandlerFailed(f"nix-instantiate {describe_exit(returncode)}")
            return HandlerFailed(f"the Nix handler failed: {summary(error)}", detail=error)

        launch = Launch(
            argv=(binary, *NIX_FLAGS, "--expr", wrapper_expression(handler_file)),
            env=nix_env(work_dir, spec.env),
            cwd=work_dir,
            program=binary,
        )
        worker = ProcessWorker(
            launch,
            concurrency=spec.target_concurrency,
            encode=encode_input,
            failure=failure,
            early_json=True,
            spares=self.spares,
        )
        await worker.start(min(spec.timeout_s, self.settle_s))
        return worker


def _handler_file(spec: FunctionSpec, work_dir: Path) -> tuple[Path, str]:
    """The file to import and how to name it in errors.

    A ``.nix`` path is imported where it is (its relative imports keep
    working); an expression is written to ``work_dir/handler.nix``.
    """
    if is_path_handler(spec.handler):
        path = spec.handler.strip()
        if not path.startswith("/"):
            raise HandlerFailed(f"a .nix file must be an absolute path: {path}")
        return Path(path), path
    target = work_dir / HANDLER_FILE
    target.write_text(spec.handler)
    return target, HANDLER_FILE
