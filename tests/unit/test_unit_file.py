"""Unit files read by the process unit driver: what is run, and what is refused (with where)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from blixard.drivers.systemd.unitfile import (
    DEFAULT_PATH,
    UnitFileError,
    UnitFileMissing,
    command_line,
    parse_unit,
    read_unit,
    split_words,
)

SH = shutil.which("sh", path=DEFAULT_PATH) or "/bin/sh"


def unit(tmp_path: Path, text: str, name: str = "web.service") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_exec_start_environment_and_working_directory(tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("# comment\nFROM_FILE='yes please'\nexport PORT=8080\n")
    text = f"""
[Unit]
Description=Web server
After=network.target

[Service]
Type=simple
Environment="GREETING=hello world" WHO=you
Environment=EMPTY=
EnvironmentFile={env_file}
EnvironmentFile=-/nonexistent/env
WorkingDirectory={tmp_path}
ExecStart=/bin/sh -c 'echo "$GREETING"' \\
    ${{WHO}} $PORT %n %N $$HOME
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
"""
    cmd = parse_unit("web.service", unit(tmp_path, text), text)
    assert cmd.argv == [
        "/bin/sh", "-c", 'echo "hello world"', "you", "8080", "web.service", "web", "$HOME"
    ]  # fmt: skip
    assert cmd.env == {
        "GREETING": "hello world",
        "WHO": "you",
        "EMPTY": "",
        "FROM_FILE": "yes please",
        "PORT": "8080",
    }
    assert cmd.cwd == tmp_path


def test_a_whole_word_variable_is_split_and_braces_are_not(tmp_path: Path) -> None:
    env = {"ARGS": "-a  -b", "ONE": "x y"}
    assert command_line("sh $ARGS ${ONE} pre${ONE}post '$ONE'", env, "here") == [
        SH, "-a", "-b", "x y", "prex ypost", "x y"
    ]  # fmt: skip
    assert command_line(":sh $ARGS", env, "here") == [SH, "$ARGS"]
    assert command_line("-sh a", env, "here") == [SH, "a"]


def test_quotes_and_escapes() -> None:
    assert split_words(r'a "b c" \'d\' e\sf "g\"h" \x41', "here") == [
        ("a", False), ("b c", True), ("'d'", False), ("e f", False), ('g"h', True), ("A", False)
    ]  # fmt: skip


def test_templates_and_lookup_order(tmp_path: Path) -> None:
    first, second = tmp_path / "etc", tmp_path / "lib"
    first.mkdir()
    second.mkdir()
    (second / "getty@.service").write_text("[Service]\nExecStart=/bin/echo %i %p %I\n")
    cmd = read_unit("getty@tty1.service", [first, second])
    assert cmd.argv == ["/bin/echo", "tty1", "getty", "tty1"]
    (first / "getty@tty1.service").write_text("[Service]\nExecStart=/bin/echo first\n")
    assert read_unit("getty@tty1.service", [first, second]).argv == ["/bin/echo", "first"]
    with pytest.raises(UnitFileMissing) as info:
        read_unit("nope.service", [first, second])
    assert str(first) in str(info.value) and "no unit file" in str(info.value)


REFUSED = [
    ("[Service]\nExecStart=/bin/true\nUser=nobody\n", ":3: User= is not supported"),
    ("[Service]\nType=forking\nExecStart=/bin/true\n", ":2: Type=forking is not supported"),
    ("[Service]\nExecStart=/bin/true\nExecStart=/bin/false\n", ":3: more than one ExecStart"),
    ("[Service]\nExecStartPre=/bin/true\nExecStart=/bin/true\n", ":2: ExecStartPre="),
    ("[Service]\nExecStart=+/bin/true\n", "prefix '+'"),
    ("[Service]\nExecStart=@/bin/true x\n", "prefix '@'"),
    ("[Service]\nExecStart=/bin/echo %h\n", "specifier %h"),
    ("[Service]\nExecStart=/bin/echo 'open\n", "unterminated ' quote"),
    ("[Service]\nExecStart=./run.sh\n", "absolute path or a plain name"),
    ("[Service]\nExecStart=no-such-program-here\n", "not found in PATH"),
    ("[Service]\nExecStart=/\n", "not an executable file"),
    ("[Service]\nWorkingDirectory=~\nExecStart=/bin/true\n", "no '~'"),
    ("[Service]\nEnvironment=not-an-assignment\nExecStart=/bin/true\n", "NAME=value"),
    ("[Unit]\nDescription=x\n", "no ExecStart="),
    ("ExecStart=/bin/true\n", "before any [Section]"),
    ("[Service]\nExecStart /bin/true\n", "expected Key=Value"),
    ("[Socket]\nListenStream=80\n", "section [Socket]"),
    ("[Service]\nExecStart=/bin/echo a\\x00b\n", "NUL"),
    ("[Service]\nEnvironment=A=x\\x00y\nExecStart=/bin/true\n", "NUL"),
]


@pytest.mark.parametrize(("text", "reason"), REFUSED)
def test_refusals_say_where_and_why(tmp_path: Path, text: str, reason: str) -> None:
    path = unit(tmp_path, text)
    with pytest.raises(UnitFileError) as info:
        parse_unit("web.service", path, text)
    assert str(path) in str(info.value) and reason in str(info.value), info.value


def test_other_unit_types_and_drop_ins_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnitFileError, match=r"\.service units only"):
        read_unit("web.socket", [tmp_path])
    unit(tmp_path, "[Service]\nExecStart=/bin/true\n")
    (tmp_path / "web.service.d").mkdir()
    (tmp_path / "web.service.d" / "override.conf").write_text("[Service]\nUser=x\n")
    with pytest.raises(UnitFileError, match="drop-in directory"):
        read_unit("web.service", [tmp_path])
