"""One exception type for every problem a user can fix (bad input, missing files, bad configs).

The command line turns it into a single-line message and a non-zero exit; anything else is a bug.
"""


class NanodrzError(Exception):
    """A user-facing error: the message is printed as is, on one line, without a traceback."""
