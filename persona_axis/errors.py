"""The one exception type users see: a problem they caused, with the fix in its message."""

from __future__ import annotations

import importlib
from typing import Any


class PersonaAxisError(Exception):
    """A user-facing error: bad model spec, wrong vector size, layer out of range, ...

    The message names the problem and what to do about it; the CLI prints it on one line.
    """


def import_optional(module: str, hint: str) -> Any:
    """The module `module` (an optional extra), else a PersonaAxisError whose message is `hint` (how to install it)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise PersonaAxisError(hint) from None
