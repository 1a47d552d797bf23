"""Names and labels: what an object may be called and how it may be tagged.

Object names end up in store keys (``/blixard/v1/<kind>/<name>``), in host
paths, in QEMU ids, in systemd unit names and in URLs, so they are held to the
strictest common rule: an RFC 1123 DNS label. Labels follow Kubernetes' rules
(``prefix/name`` keys, short values) so users can reuse what they already know
and so a label survives being put in any of those places too.

Every check raises :class:`blixard.domain.errors.ValidationError` naming the
field and the reason, and returns the value unchanged when it is good.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from blixard.domain.errors import ValidationError

DNS_LABEL_MAX = 63
DNS_SUBDOMAIN_MAX = 253
LABEL_NAME_MAX = 63
LABEL_VALUE_MAX = 63
MAX_LABELS = 64

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")

DNS_LABEL_RULE = (
    "must be a DNS label (lowercase letters, digits and '-', 1-63 characters, "
    "starting and ending with a letter or digit)"
)
LABEL_NAME_RULE = (
    "must be 1-63 characters of letters, digits, '-', '_' and '.', "
    "starting and ending with a letter or digit"
)


def _shown(value: object) -> str:
    """Quote a refused value for a message, cut short so a huge input stays readable."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_dns_label(value: str) -> bool:
    """True when ``value`` is an RFC 1123 label (the rule object names follow)."""
    return len(value) <= DNS_LABEL_MAX and _DNS_LABEL.fullmatch(value) is not None


def validate_dns_label(value: object, field: str) -> str:
    """Return ``value`` if it is a DNS label, else raise naming ``field``."""
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {_shown(value)}")
    if not is_dns_label(value):
        raise ValidationError(field, f"{DNS_LABEL_RULE}, got {_shown(value)}")
    return value


def validate_dns_subdomain(value: object, field: str) -> str:
    """Return ``value`` if it is a DNS subdomain (dot-separated DNS labels, <= 253)."""
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {_shown(value)}")
    parts = value.split(".")
    if len(value) > DNS_SUBDOMAIN_MAX or not all(is_dns_label(p) for p in parts):
        raise ValidationError(
            field,
            "must be a DNS subdomain (DNS labels separated by '.', at most 253 characters), "
            f"got {_shown(value)}",
        )
    return value


def validate_label_key(key: object, field: str) -> str:
    """Check a Kubernetes-style label key: ``[prefix/]name``.

    The optional prefix is a DNS subdomain (``blixard.dev``); the name is 1-63
    characters of letters, digits, ``-``, ``_`` and ``.``, starting and ending
    with a letter or digit (so ``gpu.memory`` and ``blixard.dev/zone`` both work).
    """
    if not isinstance(key, str):
        raise ValidationError(field, f"label key must be a string, got {_shown(key)}")
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix:
            raise ValidationError(field, f"label key has an empty prefix before '/': {key!r}")
        try:
            validate_dns_subdomain(prefix, field)
        except ValidationError:
            raise ValidationError(
                field,
                "label key prefix must be a DNS subdomain (lowercase, e.g. 'blixard.dev'), "
                f"got {_shown(prefix)} in {_shown(key)}",
            ) from None
    if len(name) > LABEL_NAME_MAX or _LABEL_NAME.fullmatch(name) is None:
        raise ValidationError(field, f"label key name {LABEL_NAME_RULE}, got {_shown(key)}")
    return key


def validate_label_value(value: object, field: str) -> str:
    """Check a label value: empty, or up to 63 characters under the label-name rule."""
    if not isinstance(value, str):
        raise ValidationError(field, f"label value must be a string, got {_shown(value)}")
    if value == "":
        return value
    if len(value) > LABEL_VALUE_MAX or _LABEL_NAME.fullmatch(value) is None:
        raise ValidationError(
            field,
            "label value must be empty or 1-63 characters of letters, digits, '-', '_' and '.', "
            f"starting and ending with a letter or digit, got {_shown(value)}",
        )
    return value


def validate_labels(labels: object, field: str) -> dict[str, str]:
    """Check a whole label map; the reason names the offending key."""
    if not isinstance(labels, Mapping):
        raise ValidationError(field, f"must be a mapping of label keys to values, got {labels!r}")
    if len(labels) > MAX_LABELS:
        raise ValidationError(field, f"at most {MAX_LABELS} labels, got {len(labels)}")
    out: dict[str, str] = {}
    for key, value in labels.items():
        validate_label_key(key, field)
        try:
            validate_label_value(value, field)
        except ValidationError as exc:
            raise ValidationError(field, f"{exc.reason} (for key {key!r})") from None
        out[key] = value
    return out


# ------------------------------------------------------------- systemd units

UNIT_NAME_MAX = 255
#: Unit types a cluster-wide service may name: the ones systemctl can start.
UNIT_TYPES = ("service", "socket", "target", "timer", "path", "mount", "automount", "swap", "slice")
_UNIT_CHARS = re.compile(r"[A-Za-z0-9:_.@-]")
_UNIT_PART = re.compile(r"[A-Za-z0-9:_.-]+")


def validate_unit_name(value: object, field: str) -> str:
    """Check a systemd unit name and return it with ``.service`` added if it had no type.

    systemd.unit(5) allows letters, digits, ``:``, ``-``, ``_``, ``.`` and
    ``\\`` (for escapes), one ``@`` for templates, and a unit-type suffix, 255
    characters at most. Blixard is stricter because the name reaches
    ``systemctl`` on every node: no backslash, no ``..``, no leading ``-`` or
    ``.``, and a template needs its instance (``getty@tty1.service``).
    """
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a systemd unit name string, got {_shown(value)}")
    if not value:
        raise ValidationError(field, "must not be empty")
    for ch in value:
        if ch.isspace():
            raise ValidationError(field, f"must not contain spaces, got {_shown(value)}")
        if ch == "/":
            raise ValidationError(
                field, f"must be a unit name, not a path (no '/'), got {_shown(value)}"
            )
        if _UNIT_CHARS.fullmatch(ch) is None:
            raise ValidationError(
                field,
                f"contains {ch!r}, which a systemd unit name may not contain "
                f"(only letters, digits, ':', '-', '_', '.' and one '@'), got {_shown(value)}",
            )
    if ".." in value:
        raise ValidationError(field, f"must not contain '..', got {_shown(value)}")
    if value.count("@") > 1:
        raise ValidationError(field, f"may contain at most one '@', got {_shown(value)}")
    if value[0] in "-.@":
        raise ValidationError(
            field, f"must start with a letter, digit, ':' or '_', got {_shown(value)}"
        )
    name = value
    stem, dot, unit_type = value.rpartition(".")
    if not dot:
        name, stem, unit_type = f"{value}.service", value, "service"
    elif unit_type not in UNIT_TYPES:
        raise ValidationError(
            field,
            f"unknown unit type {unit_type!r}; use one of {', '.join(UNIT_TYPES)} "
            f"(a name without a type gets '.service'), got {_shown(value)}",
        )
    prefix, at, instance = stem.partition("@")
    if not prefix or _UNIT_PART.fullmatch(prefix) is None:
        raise ValidationError(field, f"needs a name before the unit type, got {_shown(value)}")
    if at and (not instance or _UNIT_PART.fullmatch(instance) is None):
        raise ValidationError(
            field,
            f"is a template with no (or a bad) instance; name one, e.g. 'getty@tty1.service', "
            f"got {_shown(value)}",
        )
    if len(name) > UNIT_NAME_MAX:
        raise ValidationError(field, f"must be at most {UNIT_NAME_MAX} characters, got {len(name)}")
    return name
