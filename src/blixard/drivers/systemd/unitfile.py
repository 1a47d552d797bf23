"""Reading a ``.service`` unit file well enough to run it as a plain process.

Where systemd is not PID 1 (containers, CI, these machines) the process
unit driver (:mod:`blixard.drivers.systemd.process`) runs a unit's
``ExecStart=`` itself. This module finds the unit file in the configured
directories and reads the subset of systemd.syntax(7) and systemd.service(5)
that a single supervised process needs, **refusing everything else with the
file, line and reason** rather than running something other than what the
unit says.

Read:

* syntax: ``[Section]`` headers, ``Key=Value`` (whitespace around ``=``
  ignored), comments (``#``/``;`` lines), continuation lines (a trailing
  ``\\``), an empty assignment resetting a list (``Environment=``);
* ``[Service]`` ``ExecStart=`` (exactly one; prefixes ``-`` and ``:``), with
  systemd's command-line rules: double and single quotes, C escapes
  (``\\n``, ``\\t``, ``\\\\``, ``\\"``, ``\\'``, ``\\s``, ``\\xNN``), ``${VAR}``
  (replaced, one word) and a word that is exactly ``$VAR`` (replaced and split
  at whitespace), ``$$`` for ``$``; the program is an absolute path or a name
  looked up in ``PATH``;
* ``Environment=`` (quoted ``NAME=value`` words), ``EnvironmentFile=``
  (``NAME=value`` lines; a ``-`` prefix ignores a missing file),
  ``WorkingDirectory=`` (absolute; ``-`` prefix: ignored when missing),
  ``Type=simple`` or ``exec``;
* specifiers ``%n`` (unit name), ``%N`` (without type), ``%p`` (prefix),
  ``%i``/``%I`` (template instance) and ``%%``;
* template units: ``foo@bar.service`` falls back to ``foo@.service``.

Ignored, because Blixard does their job or they mean nothing for one process:
the whole ``[Unit]`` and ``[Install]`` sections (descriptions, ordering and
dependencies, which have no meaning outside systemd), and ``[Service]``'s
``Restart=``, ``RestartSec=``, ``Timeout*Sec=``, ``KillMode=``,
``StandardOutput=``, ``StandardError=``, ``SyslogIdentifier=`` (Blixard's
restart policy, stop timeout and task log apply).

Refused: any other key (``User=``, ``ExecStartPre=``, ``ExecStop=``,
``PIDFile=``, ...), ``Type=forking|oneshot|notify|dbus|idle``, the ``+``,
``!``, ``!!`` and ``@`` prefixes, other specifiers, unit types other than
``.service``, and drop-in directories (``<unit>.d/*.conf``), which are not read.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from blixard.drivers.protocol import DriverError, TaskGone

#: The PATH systemd gives services (and uses to find a bare ExecStart program).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_UNIT_FILE_BYTES = 1 << 20

_SUPPORTED = {"ExecStart", "Environment", "EnvironmentFile", "WorkingDirectory", "Type"}
_IGNORED = {
    "Restart",
    "RestartSec",
    "TimeoutSec",
    "TimeoutStartSec",
    "TimeoutStopSec",
    "KillMode",
    "StandardOutput",
    "StandardError",
    "SyslogIdentifier",
}
_TYPES = {"simple", "exec"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WHOLE_VAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "s": " ", "a": "\a"}


class UnitFileError(DriverError):
    """A unit file the process unit driver cannot run as it is written; says where and why."""

    code = "unit_file_unsupported"


class UnitFileMissing(TaskGone):
    """No unit file of that name in any configured unit directory."""

    code = "unit_not_found"


@dataclass(frozen=True, slots=True)
class ExecCommand:
    """What to run for a unit: argv, environment, working directory, where it was read."""

    unit: str
    path: Path
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = Path("/")


@dataclass(slots=True)
class _Line:
    number: int
    section: str
    key: str
    value: str


def find_unit_file(unit: str, unit_dirs: Sequence[Path]) -> Path:
    """The file of ``unit`` in the first directory that has it (template fallback too)."""
    if not unit.endswith(".service"):
        kind = unit.rpartition(".")[2]
        raise UnitFileError(
            f"{unit}: the process unit driver runs .service units only, not .{kind} units"
        )
    candidates = [unit]
    prefix, at, rest = unit.partition("@")
    if at and rest != ".service":
        candidates.append(f"{prefix}@.service")
    for name in candidates:
        for directory in unit_dirs:
            path = directory / name
            if path.is_file():
                _refuse_drop_ins(unit, unit_dirs)
                return path
    dirs = ", ".join(str(d) for d in unit_dirs) or "(none configured)"
    raise UnitFileMissing(f"{unit}: no unit file on this node (looked in {dirs})")


def _refuse_drop_ins(unit: str, unit_dirs: Sequence[Path]) -> None:
    for directory in unit_dirs:
        drop_in = directory / f"{unit}.d"
        if drop_in.is_dir() and any(drop_in.glob("*.conf")):
            raise UnitFileError(
                f"{unit}: drop-in directory {drop_in} has .conf files, which the process "
                "unit driver does not read; merge them into the unit file or use systemd"
            )


def read_unit(unit: str, unit_dirs: Sequence[Path]) -> ExecCommand:
    """Find and read ``unit``; UnitFileMissing or UnitFileError saying where and why."""
    path = find_unit_file(unit, unit_dirs)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UnitFileError(f"{unit}: cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_UNIT_FILE_BYTES:
        raise UnitFileError(f"{path}: larger than {MAX_UNIT_FILE_BYTES} bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise UnitFileError(f"{path}: not UTF-8 text") from None
    return parse_unit(unit, path, text)


def parse_unit(unit: str, path: Path, text: str) -> ExecCommand:
    """The command of a unit file's text (see the module docstring for what is read)."""
    where = str(path)
    lines = _lines(where, text)
    exec_start: list[_Line] = []
    env: dict[str, str] = {}
    cwd = Path("/")
    for line in lines:
        at = f"{where}:{line.number}"
        if line.section in ("Unit", "Install"):
            continue
        if line.section != "Service":
            raise UnitFileError(
                f"{at}: section [{line.section}] is not read by the process unit driver "
                "(only [Unit], [Service] and [Install])"
            )
        if line.key in _IGNORED:
            continue
        if line.key not in _SUPPORTED:
            raise UnitFileError(
                f"{at}: {line.key}= is not supported by the process unit driver "
                f"(it reads {', '.join(sorted(_SUPPORTED))}); run this unit with systemd"
            )
        value = _specifiers(unit, line.value, at)
        if line.key == "ExecStart":
            if value == "":
                exec_start.clear()
            else:
                exec_start.append(_Line(line.number, line.section, line.key, value))
        elif line.key == "Environment":
            if value == "":
                env.clear()
            else:
                env.update(_assignments(value, at))
        elif line.key == "EnvironmentFile":
            if value == "":
                continue
            env.update(_environment_file(value, at))
        elif line.key == "WorkingDirectory":
            cwd = _working_directory(value, at, cwd)
        elif value not in _TYPES:
            raise UnitFileError(
                f"{at}: Type={value} is not supported by the process unit driver "
                "(only simple and exec: one long-running main process)"
            )
    if not exec_start:
        raise UnitFileError(f"{where}: no ExecStart= in [Service]")
    if len(exec_start) > 1:
        raise UnitFileError(
            f"{where}:{exec_start[1].number}: more than one ExecStart= (only Type=oneshot "
            "allows several, and the process unit driver does not run oneshot units)"
        )
    line = exec_start[0]
    argv = command_line(line.value, env, f"{where}:{line.number}")
    return ExecCommand(unit=unit, path=path, argv=argv, env=env, cwd=cwd)


def _lines(where: str, text: str) -> list[_Line]:
    """``Key=Value`` lines with their section, continuation lines joined."""
    out: list[_Line] = []
    section = ""
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if pending and stripped[:1] in ("#", ";"):
            continue  # a comment inside a continued line is skipped
        if not pending:
            start = number
            if not stripped or stripped[0] in "#;":
                continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full, pending = pending + stripped, ""
        if full.startswith("["):
            if not full.endswith("]") or len(full) < 3:
                raise UnitFileError(f"{where}:{start}: malformed section header {full!r}")
            section = full[1:-1]
            continue
        key, eq, value = full.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UnitFileError(f"{where}:{start}: expected Key=Value, got {full!r}")
        if not section:
            raise UnitFileError(f"{where}:{start}: {key}= comes before any [Section]")
        out.append(_Line(start, section, key, value.strip()))
    if pending:
        raise UnitFileError(f"{where}: the file ends inside a continued line")
    return out


def _specifiers(unit: str, value: str, at: str) -> str:
    """Replace %n, %N, %p, %i, %I and %%; refuse any other specifier."""
    stem = unit.removesuffix(".service")
    prefix, _, instance = stem.partition("@")
    known = {"n": unit, "N": stem, "p": prefix, "i": instance, "I": instance, "%": "%"}
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        spec = value[i + 1 : i + 2]
        if spec not in known:
            shown = f"%{spec}" if spec else "a lone %"
            raise UnitFileError(
                f"{at}: specifier {shown} is not supported by the process unit driver "
                "(only %n, %N, %p, %i, %I and %%)"
            )
        out.append(known[spec])
        i += 2
    return "".join(out)


def split_words(value: str, at: str) -> list[tuple[str, bool]]:
    """systemd's word splitting: ``(word, quoted)`` pairs, quotes removed, escapes applied."""
    words: list[tuple[str, bool]] = []
    i, n = 0, len(value)
    while True:
        while i < n and value[i] in " \t":
            i += 1
        if i >= n:
            return words
        word: list[str] = []
        quoted = False
        while i < n and value[i] not in " \t":
            ch = value[i]
            if ch in "\"'":
                quoted = True
                end = i + 1
                while True:
                    if end >= n:
                        raise UnitFileError(f"{at}: unterminated {ch} quote")
                    if value[end] == "\\" and end + 1 < n:
                        decoded, end = _escape(value, end, at)
                        word.append(decoded)
                        continue
                    if value[end] == ch:
                        break
                    word.append(value[end])
                    end += 1
                i = end + 1
            elif ch == "\\":
                decoded, i = _escape(value, i, at)
                word.append(decoded)
            else:
                word.append(ch)
                i += 1
        words.append(("".join(word), quoted))


def _escape(value: str, i: int, at: str) -> tuple[str, int]:
    """The character of the escape at ``value[i]`` (a backslash) and the index after it."""
    if i + 1 >= len(value):
        raise UnitFileError(f"{at}: a lone backslash at the end of the line")
    code = value[i + 1]
    if code in _ESCAPES:
        return _ESCAPES[code], i + 2
    if code == "x":
        digits = value[i + 2 : i + 4]
        if len(digits) == 2 and all(c in "0123456789abcdefABCDEF" for c in digits):
            if digits == "00":  # no argument of a process can hold a NUL
                raise UnitFileError(f"{at}: \\x00 (NUL) cannot be in a command line")
            return chr(int(digits, 16)), i + 4
    raise UnitFileError(f"{at}: unsupported escape \\{code}")


def _assignments(value: str, at: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for word, _ in split_words(value, at):
        name, eq, val = word.partition("=")
        if not eq or _NAME.fullmatch(name) is None:
            raise UnitFileError(f"{at}: Environment= takes NAME=value words, got {word!r}")
        out[name] = val
    return out


def _environment_file(value: str, at: str) -> dict[str, str]:
    optional = value.startswith("-")
    path = Path(value[1:] if optional else value)
    if not path.is_absolute():
        raise UnitFileError(f"{at}: EnvironmentFile= needs an absolute path, got {value!r}")
    try:
        text = path.read_text()
    except FileNotFoundError:
        if optional:
            return {}
        raise UnitFileError(f"{at}: EnvironmentFile {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UnitFileError(f"{at}: cannot read EnvironmentFile {path}: {exc}") from None
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        line = line.removeprefix("export ")
        name, eq, val = line.partition("=")
        name = name.strip()
        if not eq or _NAME.fullmatch(name) is None:
            raise UnitFileError(f"{path}:{number}: expected NAME=value, got {raw!r}")
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] and val[0] in "\"'":
            val = val[1:-1]
        out[name] = val
    return out


def _working_directory(value: str, at: str, current: Path) -> Path:
    if value == "":
        return Path("/")
    optional = value.startswith("-")
    text = value[1:] if optional else value
    if not text.startswith("/"):
        raise UnitFileError(
            f"{at}: WorkingDirectory= must be an absolute path here (no '~'), got {value!r}"
        )
    path = Path(text)
    if not path.is_dir():
        if optional:
            return current
        raise UnitFileError(f"{at}: WorkingDirectory {path} does not exist")
    return path


def command_line(value: str, env: dict[str, str], at: str) -> list[str]:
    """ExecStart='s argv: prefixes, words, variables, then the program found."""
    substitute = True
    while value[:1] in ("-", ":", "@", "+", "!"):
        prefix = value[0]
        if prefix in "+!@":
            what = {
                "+": "runs with full privileges",
                "!": "changes privileges",
                "@": "sets argv[0] apart",
            }[prefix]
            raise UnitFileError(
                f"{at}: the ExecStart= prefix {prefix!r} ({what}) is not supported by the "
                "process unit driver"
            )
        if prefix == ":":
            substitute = False
        value = value[1:]
    argv: list[str] = []
    for word, quoted in split_words(value, at):
        if not substitute:
            argv.append(word)
            continue
        whole = _WHOLE_VAR.fullmatch(word)
        if whole is not None and not quoted:
            argv.extend(env.get(whole.group(1), "").split())
            continue
        argv.append(_VAR.sub(lambda m: _var(m, env), word))
    if not argv:
        raise UnitFileError(f"{at}: ExecStart= names no program")
    return [_program(argv[0], env, at), *argv[1:]]


def _var(match: re.Match[str], env: dict[str, str]) -> str:
    if match.group(0) == "$$":
        return "$"
    return env.get(match.group(1) or match.group(2), "")


def _program(program: str, env: dict[str, str], at: str) -> str:
    if program.startswith("/"):
        path = Path(program)
        # Mode bits, not os.access: for root, access() calls any existing file executable.
        if not path.is_file() or not path.stat().st_mode & 0o111:
            raise UnitFileError(f"{at}: {program} is not an executable file on this node")
        return program
    if "/" in program:
        raise UnitFileError(
            f"{at}: the program must be an absolute path or a plain name, got {program!r}"
        )
    found = shutil.which(program, path=env.get("PATH", DEFAULT_PATH))
    if found is None:
        raise UnitFileError(f"{at}: {program!r} is not found in PATH on this node")
    return found
