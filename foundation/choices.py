"""Choice-valued settings are Enums: OmegaConf rejects a typo in a config before anything
starts, naming the choices; ``choice`` does the same for values built in code."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

E_ = TypeVar("E_", bound=Enum)


def choice(kind: type[E_], value: object, key: str) -> E_:
    """``value`` as a member of ``kind``, or a ValueError naming ``key`` and the choices."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is unknown; choose from "
                         f"{[member.value for member in kind]}") from None
