"""The base of every error whose message already says what is wrong and what to do.

The ``rcnnops`` command prints such an error on one line and exits with status 2;
anything else is a bug and keeps its traceback. Importing this costs nothing (no
torch), so the command can catch them all without loading the training code.
"""


class UserError(Exception):
    """Bad input, a missing or corrupt file, a busy project: explained in the message."""
