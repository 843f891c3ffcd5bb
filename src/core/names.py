"""Names that become paths. An experiment, an ensemble, a TTA run and a tuning study are each a folder under OUTPUTS
(and a file under submissions/ or configs/), so a name is a plain name: `..` would be OUTPUTS' parent, `/tmp/x` a
folder anywhere, `a/b` a folder inside another experiment's. Checked where configs and the command line are
resolved (the config schema, config and ensemble files, the commands that take a name), each with one line.
Standard library only: the command line checks names before anything is installed."""
from __future__ import annotations

import re
from typing import Optional

from .errors import UserError, quoted
from .paths import SHARED_OUTPUT_FOLDERS

PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def name_problem(name: object) -> Optional[str]:
    """What is wrong with `name` as the name of an experiment, ensemble, TTA run or study; None when nothing."""
    if isinstance(name, str) and name in SHARED_OUTPUT_FOLDERS:
        return (f"the name of a folder OUTPUTS shares between experiments ({', '.join(SHARED_OUTPUT_FOLDERS)}); "
                "choose another name")
    if isinstance(name, str) and PLAIN_NAME.fullmatch(name):
        return None
    return ("not a plain name: use letters, digits, '_', '-' and '.', starting with a letter, digit or '_' (so not "
            "'.' or '..', and no '/'), at most 128 characters")


def check_name(name: str, what: str) -> str:
    """`name`, or one line naming `what` it was (e.g. 'ensemble'), the name and the rule."""
    problem = name_problem(name)
    if problem:
        raise UserError(f"{what} {quoted(name, 60)}: {problem}")
    return name
