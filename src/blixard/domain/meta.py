"""What every stored object shares: metadata and the spec/status split.

``spec`` is what users ask for (through the API); ``status`` is what agents
and controllers observe. They have different base classes because they have
different readers to protect:

* :class:`SpecModel` refuses unknown fields, so a typo such as ``memroy_mib``
  is an error instead of a silently ignored wish.
* :class:`StatusModel` ignores unknown fields, so during a rolling upgrade an
  older controller can still read the status a newer agent wrote.
"""

from __future__ import annotations

from typing import ClassVar, Self
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from blixard.domain.fields import Labels, Name
from blixard.domain.keys import Kind, object_key


class SpecModel(BaseModel):
    """Base of every user-written model: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


class StatusModel(BaseModel):
    """Base of every machine-written status: unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")


class ObjectMeta(SpecModel):
    """Identity and bookkeeping of one object.

    Users write ``name`` and ``labels``. The API sets ``uid`` and
    ``created_at`` on create and bumps ``generation`` whenever the spec
    changes (1 on create; 0 means "never stored"), so a status can say which
    generation it reflects. ``resource_version`` is the store's mod revision of
    the key as it was read: the store layer sets it on every read, and writers
    send it back as the compare-and-swap condition. Whatever value the stored
    JSON holds for it is stale by construction and is overwritten on read.
    """

    name: Name
    uid: UUID | None = None
    labels: Labels = Field(default_factory=dict)
    generation: int = Field(default=0, ge=0, strict=True)
    resource_version: int = Field(default=0, ge=0, strict=True)
    created_at: AwareDatetime | None = None


class StoredObject(SpecModel):
    """Base of the top-level kinds: knows its store kind and key.

    Each subclass narrows ``kind`` to a literal naming the document kind
    (e.g. ``"VM"``, so a file given to ``apply`` can hold several kinds) and
    adds ``spec`` and ``status``.
    """

    STORE_KIND: ClassVar[Kind]

    #: The document kind; each subclass narrows it to its own literal.
    kind: str
    metadata: ObjectMeta

    def key(self) -> str:
        """The object's store key, ``/blixard/v1/<kind>/<name>``."""
        return object_key(self.STORE_KIND, self.metadata.name)

    def with_resource_version(self, revision: int) -> Self:
        """A copy carrying ``revision`` as its resource_version (used by the store on read)."""
        meta = self.metadata.model_copy(update={"resource_version": revision})
        return self.model_copy(update={"metadata": meta})
