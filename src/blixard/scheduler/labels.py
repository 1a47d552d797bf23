"""Node label conventions the scheduler reads: local data and special hardware.

Nodes describe themselves with plain labels (``metadata.labels``), set by
operators, so no new field is needed in the domain model.

**Local data.** A node that holds the data named by a ``data_hint`` carries
the label key :func:`data_label` ``(hint)`` (any value: ``primary``,
``replica``, empty). A hint such as ``ceph-pool:raw-data`` cannot be a label
key or value as it is (label names allow only letters, digits, ``-``, ``_``
and ``.``), so the key is ``data.blixard.io/`` followed by the hint with every
other character replaced by ``.``: ``data.blixard.io/ceph-pool.raw-data``.
A hint whose replaced form is not a valid label name (longer than 63
characters, or not starting and ending with a letter or digit) uses
``sha256-`` and the first 32 hex digits of the hint's SHA-256 instead
(``printf %s "$hint" | sha256sum | cut -c1-32``). Two hints that differ only in
replaced characters (``a:b`` and ``a/b``) share a label; this only blurs a
soft preference, never a hard rule.

**Special hardware.** :data:`SPECIAL_HARDWARE` lists the labels that mark
scarce hardware (a GPU, an FPGA, a high-memory machine). The specialization
weigher steers requests that ask for such hardware (through node_selector,
preferred_labels or an ``=`` constraint) onto those nodes, and keeps other
requests off them so the hardware stays free for those who need it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from functools import lru_cache

from blixard.domain.names import LABEL_NAME_MAX

DATA_LABEL_PREFIX = "data.blixard.io/"

#: (label key, value) pairs that mark special hardware on a node.
SPECIAL_HARDWARE: frozenset[tuple[str, str]] = frozenset(
    {
        ("gpu", "available"),
        ("fpga", "available"),
        ("memory-class", "high-memory"),
    }
)

_NOT_LABEL_CHAR = re.compile(r"[^A-Za-z0-9._-]")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


@lru_cache(maxsize=1024)
def data_label(hint: str) -> str:
    """The node label key that says a node holds the data named by ``hint``."""
    name = _NOT_LABEL_CHAR.sub(".", hint)
    if len(name) > LABEL_NAME_MAX or _LABEL_NAME.fullmatch(name) is None:
        name = "sha256-" + hashlib.sha256(hint.encode()).hexdigest()[:32]
    return DATA_LABEL_PREFIX + name


_SPECIAL_KEYS = frozenset(key for key, _ in SPECIAL_HARDWARE)
_NONE: frozenset[tuple[str, str]] = frozenset()


def special_hardware(labels: Mapping[str, str]) -> frozenset[tuple[str, str]]:
    """The special-hardware labels among ``labels``."""
    if _SPECIAL_KEYS.isdisjoint(labels):  # most nodes: one set operation
        return _NONE
    return frozenset(item for item in SPECIAL_HARDWARE if labels.get(item[0]) == item[1])
