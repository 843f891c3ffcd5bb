"""Errors the user can act on."""


class UserError(Exception):
    """A problem with the user's data, config or files.

    The command line prints its message as a single line (file, row or key, and what to do) and exits
    with status 2, instead of a traceback.
    """


def one_line(error: Exception) -> str:
    """The message of a UserError, also when a DataLoader worker wrapped it in a traceback."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].removeprefix(f"{UserError.__module__}.{UserError.__name__}: ") if lines else repr(error)


def first_line(error: BaseException, limit: int = 300) -> str:
    """'Type: first line of the message' of a library's exception, cut to `limit` characters of message, for the one
    line that names what failed."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:limit]}" if lines else type(error).__name__
