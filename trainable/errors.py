"""The one exception type for problems the user can fix (bad input, missing files, bad flags).

The CLIs catch it once at the top and print its message as one line, exit code 2, no traceback.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message names the problem and the fix, on one line."""


class SearchStopped(Exception):
    """The search stopped on something outside the input (Ray's memory monitor killed a worker Tune needed): one
    line naming it and how to continue, exit code 1, results so far kept."""
