"""Errors the user can act on."""


class UserError(Exception):
    """A problem with the user's data, config or files.

    The command line prints its message as a single line (file, row or key, and what to do) and exits
    with status 2, instead of a traceback.
    """
