"""Names, labels and systemd unit names: accepted forms and the refusals' field and reason."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blixard.domain.errors import ValidationError
from blixard.domain.names import (
    is_dns_label,
    validate_dns_label,
    validate_dns_subdomain,
    validate_label_key,
    validate_label_value,
    validate_labels,
    validate_unit_name,
)

dns_labels = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True)


@pytest.mark.parametrize("name", ["a", "web", "web-1", "0", "1abc", "a" * 63, "x-y-z9"])
def test_dns_label_accepted(name: str) -> None:
    assert validate_dns_label(name, "metadata.name") == name


def test_dns_label_error_names_field_and_value() -> None:
    with pytest.raises(ValidationError) as info:
        validate_dns_label("My_VM", "metadata.name")
    assert info.value.field == "metadata.name"
    assert info.value.reason == (
        "must be a DNS label (lowercase letters, digits and '-', 1-63 characters, "
        "starting and ending with a letter or digit), got 'My_VM'"
    )
    assert str(info.value).startswith("metadata.name: must be a DNS label")


@pytest.mark.parametrize(
    "name", ["", "-web", "web-", "Web", "web_1", "web.1", "a" * 64, "wéb", "web 1", "web/1"]
)
def test_dns_label_refused(name: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate_dns_label(name, "spec.node")
    assert info.value.field == "spec.node"
    assert "must be a DNS label" in info.value.reason
    assert repr(name) in info.value.reason


def test_dns_label_refuses_non_string() -> None:
    with pytest.raises(ValidationError) as info:
        validate_dns_label(42, "name")
    assert info.value.reason == "must be a string, got 42"


@given(dns_labels)
def test_property_valid_dns_labels_accepted(name: str) -> None:
    assert is_dns_label(name)
    assert validate_dns_label(name, "n") == name


@given(dns_labels, st.integers(min_value=0), st.sampled_from(string.ascii_uppercase))
def test_property_any_uppercase_letter_refused(name: str, pos: int, upper: str) -> None:
    index = pos % (len(name) + 1)
    bad = name[:index] + upper + name[index:]
    with pytest.raises(ValidationError) as info:
        validate_dns_label(bad, "metadata.name")
    assert info.value.field == "metadata.name"


def test_dns_subdomain() -> None:
    assert validate_dns_subdomain("blixard.dev", "f") == "blixard.dev"
    for bad in ["", "a..b", ".a", "A.b", "a." + "b" * 64]:
        with pytest.raises(ValidationError) as info:
            validate_dns_subdomain(bad, "f")
        assert info.value.field == "f"
        assert "must be a DNS subdomain" in info.value.reason


@pytest.mark.parametrize(
    "key", ["storage", "gpu.memory", "blixard.dev/zone", "a.b.c/x_y-z.1", "Zone", "k" * 63]
)
def test_label_key_accepted(key: str) -> None:
    assert validate_label_key(key, "metadata.labels") == key


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("", "label key name must be"),
        ("-a", "label key name must be"),
        ("a-", "label key name must be"),
        ("has space", "label key name must be"),
        ("k" * 64, "label key name must be"),
        ("/name", "empty prefix"),
        ("Blixard.dev/zone", "prefix must be a DNS subdomain"),
        ("a/b/c", "prefix must be a DNS subdomain"),
        ("blixard.dev/", "label key name must be"),
    ],
)
def test_label_key_refused(key: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate_label_key(key, "metadata.labels")
    assert info.value.field == "metadata.labels"
    assert fragment in info.value.reason


@pytest.mark.parametrize("value", ["", "nvme", "a.b_c-d", "V" * 63])
def test_label_value_accepted(value: str) -> None:
    assert validate_label_value(value, "f") == value


@pytest.mark.parametrize("value", ["v" * 64, "-x", "x-", "a b", "a/b", "a=b"])
def test_label_value_refused(value: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate_label_value(value, "spec.zone")
    assert info.value.field == "spec.zone"
    assert info.value.reason.startswith("label value must be empty or 1-63 characters")


def test_labels_map() -> None:
    assert validate_labels({"gpu": "available", "blixard.dev/zone": "a"}, "l") == {
        "gpu": "available",
        "blixard.dev/zone": "a",
    }
    with pytest.raises(ValidationError) as info:
        validate_labels({"gpu": "not ok"}, "metadata.labels")
    assert info.value.field == "metadata.labels"
    assert info.value.reason.endswith("(for key 'gpu')")
    with pytest.raises(ValidationError) as info:
        validate_labels(["gpu"], "metadata.labels")
    assert "must be a mapping" in info.value.reason
    with pytest.raises(ValidationError) as info:
        validate_labels({f"k{i}": "v" for i in range(65)}, "metadata.labels")
    assert info.value.reason == "at most 64 labels, got 65"


# ------------------------------------------------------------------ unit names


@pytest.mark.parametrize(
    ("unit", "stored"),
    [
        ("nginx", "nginx.service"),
        ("nginx.service", "nginx.service"),
        ("getty@tty1.service", "getty@tty1.service"),
        ("backup.timer", "backup.timer"),
        ("my_app-2:x.socket", "my_app-2:x.socket"),
        ("systemd-journald", "systemd-journald.service"),
        ("foo.bar.service", "foo.bar.service"),
    ],
)
def test_unit_name_accepted(unit: str, stored: str) -> None:
    assert validate_unit_name(unit, "spec.unit") == stored


@pytest.mark.parametrize(
    ("unit", "fragment"),
    [
        ("nginx;reboot", "contains ';'"),
        ("$(reboot).service", "contains '$'"),
        ("`id`.service", "contains '`'"),
        ("a|b", "contains '|'"),
        ("a&b", "contains '&'"),
        ("a>b", "contains '>'"),
        ("a\\x2db.service", "contains '\\\\'"),
        ("/etc/systemd/system/x.service", "not a path (no '/')"),
        ("../x.service", "not a path (no '/')"),
        ("a..service", "must not contain '..'"),
        ("nginx .service", "must not contain spaces"),
        ("nginx\n", "must not contain spaces"),
        ("-nginx.service", "must start with a letter"),
        (".service", "must start with a letter"),
        ("nginx.conf", "unknown unit type 'conf'"),
        ("sys.device", "unknown unit type 'device'"),
        ("getty@.service", "is a template"),
        ("a@b@c.service", "at most one '@'"),
        ("", "must not be empty"),
        ("x" * 250 + ".service", "at most 255 characters"),
    ],
)
def test_unit_name_refused(unit: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate_unit_name(unit, "spec.unit")
    assert info.value.field == "spec.unit"
    assert fragment in info.value.reason, info.value.reason


@given(st.text(alphabet=";$()`|&<>'\"*?!{}[] /\\\n\t", min_size=1, max_size=3), dns_labels)
def test_property_unit_name_with_shell_metacharacters_refused(bad: str, name: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate_unit_name(name + bad + ".service", "spec.unit")
    assert info.value.field == "spec.unit"
