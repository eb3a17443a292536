"""Choice-valued settings are Enums: OmegaConf rejects a typo in a config before anything
starts, naming the choices; ``choice`` does the same for values built in code."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

E_ = TypeVar("E_", bound=Enum)


class Choice(str, Enum):
    """A choice whose ``str()`` and f-string form are its value (as 3.11's ``StrEnum``), so
    messages, file names and manifests read ``fp16``, not ``Precision.fp16``."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


# Unreadable data (a corrupt shard or sample, a bad media file): ``raise`` naming it, or
# ``skip`` it, counted and reported (``data.on_error``, the build's ``on_error``). Configs
# name members by name, and ``raise`` is a keyword: hence the functional form.
OnError = Enum("OnError", {"raise": "raise", "skip": "skip"}, type=str, module=__name__)
RAISE = OnError["raise"]


def choice(kind: type[E_], value: object, key: str) -> E_:
    """``value`` as a member of ``kind``, or a ValueError naming ``key`` and the choices."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is unknown; choose from "
                         f"{[member.value for member in kind]}") from None


class BundleKind(Choice):
    """What a serving bundle serves: a ``member_model`` (member embeddings scored against
    the catalogue: pretraining, retrieval), a ``candidate_scorer`` (logits for the
    candidates a caller gives: ranking, messaging) or ``search`` (a query, and the member
    who typed it, scored against the catalogue)."""

    member_model = "member_model"
    candidate_scorer = "candidate_scorer"
    search = "search"
