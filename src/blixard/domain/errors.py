"""The one error tree of Blixard.

Every layer raises these and nothing else across its boundary, so the API and
the CLI can turn any failure into a clear message (field and reason) and an
exit code without knowing which backend or driver produced it.
"""

from __future__ import annotations


class BlixardError(Exception):
    """Base of every error Blixard raises on purpose."""

    #: Short machine-readable code used by the API and the CLI.
    code = "error"


class ValidationError(BlixardError):
    """Bad input: names the offending field and why it is refused."""

    code = "invalid"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFound(BlixardError):
    """The object, key or lease does not exist."""

    code = "not_found"


class AlreadyExists(BlixardError):
    """An object of that kind and name exists already."""

    code = "already_exists"


class Conflict(BlixardError):
    """A compare-and-swap lost: someone else wrote first. Re-read and retry."""

    code = "conflict"


class StoreError(BlixardError):
    """Base of the state store's own failures."""

    code = "store_error"


class StoreUnavailable(StoreError):
    """The store did not answer in time or cannot be reached.

    For a write this also means the outcome is unknown: the write may or may
    not have been applied, and it is never retried blindly.
    """

    code = "store_unavailable"


class Compacted(StoreError):
    """A watch asked for history older than the store keeps.

    The caller re-lists (range) and watches again from the listed revision.
    """

    code = "compacted"

    def __init__(self, requested_revision: int, compact_revision: int) -> None:
        super().__init__(
            f"revision {requested_revision} is compacted; history starts after {compact_revision}"
        )
        self.requested_revision = requested_revision
        self.compact_revision = compact_revision


class LeaseNotFound(NotFound):
    """The lease expired or was revoked; keys attached to it are gone."""

    code = "lease_not_found"


# --- serverless functions: the gateway's and the runtimes' answers ---------------------
# One set of classes for the server (which raises them) and the client (which maps the
# answer's code back to them), like every other error here.


class PayloadTooLarge(ValidationError):
    """413: the event is larger than the gateway's limit.

    A ValidationError, so the CLI exits 2 as for any bad input: sending the same
    event again can never succeed. ``str()`` is the message as is.
    """

    code = "payload_too_large"

    def __init__(self, message: str, field: str = "event") -> None:
        BlixardError.__init__(self, message)
        self.field = field
        self.reason = message


class TooManyRequests(BlixardError):
    """429: the function's executions and this gateway's queue are full; retry later."""

    code = "too_many_requests"


class HandlerFailed(BlixardError):
    """502: the handler crashed, exited non-zero, or answered something that is not a response.

    ``detail`` is the handler's own words (stderr tail, evaluator error), for logs.
    """

    code = "handler_failed"

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class NoCapacity(BlixardError):
    """503: no node can run a worker of the function (the message says why, per node)."""

    code = "no_capacity"


class HandlerTimeout(BlixardError):
    """504: the execution ran past the function's timeout and was killed."""

    code = "handler_timeout"
