"""Errors the core raises on purpose.

`InputError` is bad user input: the command line prints its message as one line and exits with code 2;
the Slicer module shows it in a message box. `Cancelled` is raised by a progress callback to stop a run.
"""


class InputError(ValueError):
    """The input cannot be used; the message says what is wrong and what to do."""


class Cancelled(Exception):
    """The user cancelled the run (raised from a progress callback)."""
