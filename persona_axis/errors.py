"""The one exception type users see: a problem they caused, with the fix in its message."""


class PersonaAxisError(Exception):
    """A user-facing error: bad model spec, wrong vector size, layer out of range, ...

    The message names the problem and what to do about it; the CLI prints it on one line.
    """
