"""A request's derived facts, computed once per placement instead of once per node.

Work that depends on the request alone (parsing constraints, turning lists
into sets, finding the data label) is done here once. ``place()`` computes
the facts at its start and hands them to the filters' and weighers' batch
methods. The per-node plugin protocol (``check(node, request)``,
``weigh(node, request)``) passes only the request, so :func:`request_facts`
remembers the last request it saw, by identity: a caller checking many nodes
for one request computes the facts once. Requests are frozen; their
``placement`` must not be mutated once the request has been placed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from blixard.domain.placement import ConstraintOp
from blixard.scheduler.constraints import CompiledConstraint, compile_constraint
from blixard.scheduler.interface import Request
from blixard.scheduler.labels import SPECIAL_HARDWARE, data_label


@dataclass(slots=True)
class RequestFacts:
    """What the plugins need from a request, in the shape that is cheap to test per node.

    Read-only by convention (not frozen: a frozen dataclass is slower to build,
    and one is built per placement).
    """

    #: The hypervisor's value (a plain string, like NodeFacts.hypervisors).
    hypervisor: str
    needs_kvm: bool
    near_zone: str | None
    vcpus: int
    memory_mib: int
    disk_mib: int
    selector: tuple[tuple[str, str], ...]
    constraints: tuple[CompiledConstraint, ...]
    anti_affinity: frozenset[str]
    affinity: frozenset[str]
    preferred: tuple[tuple[str, str], ...]
    #: The label key of the request's data hint (see labels.data_label), or None.
    data_key: str | None
    #: The special-hardware labels the request asks for (selector, preferred, = constraints).
    wants_special: frozenset[tuple[str, str]]
    #: Refusal texts by cause, built once per placement: many nodes share a cause
    #: (label storage is ssd), and formatting the text costs more than finding it.
    notes: dict[tuple[object, ...], str] = field(default_factory=dict)


class _Memo(threading.local):
    """Per thread, so concurrent schedulers in threads never see each other's request."""

    def __init__(self) -> None:
        self.request: Request | None = None
        self.facts: RequestFacts | None = None


_memo = _Memo()


def request_facts(request: Request) -> RequestFacts:
    """The facts of ``request``, computed at most once in a row for the same object."""
    memo = _memo
    if memo.request is request and memo.facts is not None:
        return memo.facts
    computed = _compute(request)
    memo.request, memo.facts = request, computed
    return computed


def _compute(request: Request) -> RequestFacts:
    p = request.placement
    res = request.resources
    selector, preferred = p.node_selector, p.preferred_labels
    constraints, hint = p.constraints, p.data_hint
    anti, affinity = p.anti_affinity_groups, p.affinity_groups
    if not (selector or preferred or constraints or hint or anti or affinity):
        # The common case (a plain VM): nothing to sort, parse or hash.
        return RequestFacts(
            request.hypervisor.value,
            request.needs_kvm,
            request.near_zone,
            res.vcpus,
            res.memory_mib,
            res.disk_mib,
            (),
            (),
            _EMPTY,
            _EMPTY,
            (),
            None,
            _EMPTY_SPECIAL,
        )
    asked = set(selector.items()) | set(preferred.items())
    asked |= {(c.key, c.value) for c in constraints if c.op is ConstraintOp.EQ}
    return RequestFacts(
        hypervisor=request.hypervisor.value,
        needs_kvm=request.needs_kvm,
        near_zone=request.near_zone,
        vcpus=res.vcpus,
        memory_mib=res.memory_mib,
        disk_mib=res.disk_mib,
        selector=tuple(sorted(selector.items())),
        constraints=tuple(compile_constraint(c) for c in constraints),
        anti_affinity=frozenset(anti),
        affinity=frozenset(affinity),
        preferred=tuple(sorted(preferred.items())),
        data_key=None if hint is None else data_label(hint),
        wants_special=frozenset(asked & SPECIAL_HARDWARE),
    )


_EMPTY: frozenset[str] = frozenset()
_EMPTY_SPECIAL: frozenset[tuple[str, str]] = frozenset()
