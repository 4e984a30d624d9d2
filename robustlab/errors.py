"""The one exception type for problems the user can fix (bad input, missing files, bad options).

The CLI prints its message without a traceback and exits with status 2.
"""


class RobustlabError(ValueError):
    """A problem with what the user asked for or supplied; the message says what and how to fix it."""
