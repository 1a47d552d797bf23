"""Pure parts of the command and nix runtimes: no process is started here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blixard.functions.command import command_failure
from blixard.functions.nix import (
    clean_error,
    encode_input,
    is_path_handler,
    nix_string,
    summary,
    wrapper_expression,
)
from blixard.functions.processes import complete_json, describe_exit, tail_text

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(JSON)
def test_a_whole_object_array_or_string_is_complete_and_no_prefix_is(value: object) -> None:
    doc = json.dumps(value).encode()
    expected = doc[:1] in (b"{", b"[", b'"')
    assert complete_json(doc) == expected
    assert complete_json(b"  " + doc + b"\n") == expected
    for cut in range(1, len(doc)):
        assert not complete_json(doc[:cut]), doc[:cut]


def test_complete_json_edge_cases() -> None:
    assert not complete_json(b"")
    assert not complete_json(b'"')
    assert not complete_json(b"12")  # could still be 123
    assert not complete_json(b'{"a":1}{')
    assert complete_json(b'{"body":"x","statusCode":200}')
    assert not complete_json(b"[" + b"1," * 40000 + b"1]")  # too long to check early


def test_describe_exit() -> None:
    assert describe_exit(0) == "exited with status 0"
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(-9) == "was killed by signal 9 (SIGKILL)"
    assert describe_exit(-200) == "was killed by signal 200 (unknown)"


def test_tail_text_keeps_the_end_from_a_line_start() -> None:
    raw = b"first line\n" + b"x" * 3000 + b"\nlast words\n"
    assert tail_text(raw) == "last words"
    assert tail_text(b"short\n") == "short"
    assert tail_text(b"\xff\xfe bad utf-8") == "\ufffd\ufffd bad utf-8"
    assert len(tail_text(b"y" * 5000)) == 2048


def test_command_failure_message() -> None:
    exc = command_failure(3, b"Traceback...\nValueError: nope\n")
    assert str(exc) == "the handler exited with status 3: ValueError: nope"
    assert exc.detail == "Traceback...\nValueError: nope"
    assert str(command_failure(-11, b"")) == "the handler was killed by signal 11 (SIGSEGV)"


@given(st.text())
def test_nix_string_escapes_everything_nix_interprets(text: str) -> None:
    literal = nix_string(text)
    assert literal.startswith('"') and literal.endswith('"')
    inner = literal[1:-1]
    # every '"', '$' and '\\' of the text is escaped: none can end the string or interpolate
    i = 0
    while i < len(inner):
        if inner[i] == "\\":
            assert inner[i + 1] in '\\"$'
            i += 2
            continue
        assert inner[i] not in '"$'
        i += 1


def test_wrapper_expression_quotes_the_path() -> None:
    expr = wrapper_expression(Path('/w/a "b" ${x}/handler.nix'))
    assert 'import "/w/a \\"b\\" \\${x}/handler.nix"' in expr
    assert 'builtins.readFile "/dev/stdin"' in expr


@pytest.mark.parametrize(
    ("handler", "is_path"),
    [
        ("/srv/fn/handler.nix", True),
        ("  /srv/fn/handler.nix\n", True),
        ("./handler.nix", True),
        ("{ event, context }: { statusCode = 200; body = ./x.nix; }", False),
        ("{ event, context }:\n import ./x.nix", False),
    ],
)
def test_is_path_handler(handler: str, is_path: bool) -> None:
    assert is_path_handler(handler) is is_path


def test_encode_input_carries_event_and_context_apart() -> None:
    ctx = {"function": "f", "requestId": "r1", "http": None}
    doc = json.loads(encode_input(b'{"type": "ping"}', ctx))
    assert doc == {"event": {"type": "ping"}, "context": ctx}
    assert json.loads(encode_input(b"", ctx))["event"] is None
    forged = b'1, "context": {"requestId": "forged"}'
    doc = json.loads(encode_input(forged, ctx))
    assert doc == {"event": forged.decode(), "context": ctx}


def test_clean_error_drops_noise_and_private_paths() -> None:
    stderr = (
        "warning: the group 'nixbld' specified in 'build-users-group' does not exist\n"
        "error: attribute 'type' missing\n\n"
        "       at /var/lib/blixard/w/1/handler.nix:1:87:\n"
        "(use '--show-trace' to show detailed location information)\n"
    )
    text = clean_error(stderr, Path("/var/lib/blixard/w/1/handler.nix"), "handler.nix")
    assert text == "error: attribute 'type' missing\n\n       at handler.nix:1:87:"
    assert summary(text) == "attribute 'type' missing"
    assert summary("") == ""
