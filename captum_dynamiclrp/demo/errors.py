"""The one exception the ``dynamiclrp`` command turns into a one-line message."""

from __future__ import annotations


class DemoError(Exception):
    """A problem the user can fix (a missing file, a model that cannot be loaded, a bad target).

    The command prints ``dynamiclrp: error: <message>`` on one line, without a traceback,
    and exits with ``exit_code``.

    Args:
        message (str): One line saying what went wrong and, where possible, what to do.
        exit_code (int, optional): Process exit status (default 2, as for a usage error).
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(" ".join(str(message).split()))
        self.exit_code = exit_code
