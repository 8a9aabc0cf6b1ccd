"""The one exception type users see as a one-line message instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input or setup.

    The CLI prints ``error: <message>`` and exits with code 2, no traceback. The message should
    name what is wrong (file, line, sample, key) and how to fix it.
    """
