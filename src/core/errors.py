"""Errors the user can act on."""
import errno
import reprlib
from typing import Optional

DISK_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is used up"}
DISK_FULL_REMEDY = ("free some space (or point --outputs at another disk) and rerun the same command: finished epochs "
                    "and folds are kept")


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


def quoted(value: object, limit: int = 100) -> str:
    """repr of a value the user gave, at most `limit` characters, for a one-line message. Nested lists and mappings
    are walked only a few levels and items deep: nine lines of YAML aliases make a list whose full repr is
    gigabytes."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict, short.maxset = 3, 6, 6, 6, 6
    short.maxstring = short.maxother = short.maxlong = limit
    text = short.repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def disk_full_in(error: BaseException) -> Optional[OSError]:
    """The OSError of a full disk or quota (ENOSPC, EDQUOT) that `error` is or arose from (torch's zip writer, for
    one, raises a RuntimeError while the OSError unwinds), or None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
