"""One exception type for every problem a user can fix (bad input, missing files, bad configs).

The command line turns it into a single-line message and a non-zero exit; anything else is a bug.
"""


class NanodrzError(Exception):
    """A user-facing error: the message is printed as is, on one line, without a traceback."""


class ConfigError(NanodrzError, ValueError):
    """A bad configuration: an unknown key, a value of the wrong type or out of range, settings that contradict
    each other. Also a ValueError, what Python code expects for a bad argument value."""
