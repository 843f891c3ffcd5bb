"""What run.sh runs before a command: it finds the Python that has what the command needs, installing only what is
missing, and prints that Python's path. It runs in the Python run.sh starts from (.venv/bin/python when .venv
exists, else $PYTHON or python3) and uses the standard library alone, since nothing may be installed yet.

- A Python whose packages are in the tested ranges (requirements.txt and the groups the command needs) is used as it
  is. Nothing is installed, whatever versions the lock names.
- Otherwise only what is missing is installed, and an installed torch is never replaced. Outside .venv every package
  already in range stays where it is; .venv, which shadows the system's packages without changing them, gets the
  lock's version of each. The versions are the lock's, or, beside a torch that is not the lock's, the newest in
  range that fits it. The packages go into the Python in use when it is a virtual environment (.venv, or the
  user's own); else into a new .venv that sees the system's site-packages, so the platform's CUDA torch is reused;
  else, where venv cannot be made (no ensurepip, as on Colab), into the user site; else the message says what to run.
- Offline, or from a wheel folder that lacks something, it stops with one line that names the missing packages and
  the `pip download` command that makes a folder of them. `--wheels DIR` (or ARTIST_WHEELS=DIR) installs from such a
  folder alone.
- A failed install leaves nothing behind: pip fetches everything before it installs anything, and a .venv made for
  the install is removed.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import site
import socket
import subprocess
import sys
import tempfile
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from .cli import COMMANDS
from .core import requirements as req
from .core.errors import UserError
from .core.paths import CONFIG_DIR, OUTPUTS, REPO

VENV = REPO / ".venv"
LOG = OUTPUTS / "install.log"
WHEELS_VARIABLE = "ARTIST_WHEELS"
PYPI = "https://pypi.org/simple"
PROBE_SECONDS = 10
NOT_FOUND = re.compile(r"No matching distribution found for (\S+)")


class Stop(Exception):
    """Why the command cannot run yet and what to do, as one line."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def needs_of(command: list[str]) -> tuple[str, ...]:
    """The requirement groups a command line needs (an experiment's name runs it; an unknown command needs the
    core, and the command line then says it is unknown)."""
    name = command[0] if command else "help"
    if name not in COMMANDS and (CONFIG_DIR / f"{name}.yaml").is_file():
        name = "run"
    return COMMANDS[name].needs if name in COMMANDS else (req.CORE,)


def in_virtual_environment() -> bool:
    return sys.prefix != sys.base_prefix


def install_plan(needed: list[req.Requirement], missing: list[tuple[req.Requirement, Optional[str]]],
                 own_venv: bool = False) -> tuple[list[str], list[str]]:
    """(what pip is asked for, what it must leave at its installed version). The lock's versions, unless torch is
    installed at another version than the lock's: then the ranges, for pip to pick what fits that torch. In .venv
    (`own_venv`), whose packages shadow the system's without changing them, every needed package that is not at the
    lock's version is asked for at it, so that a bare Python (CI) runs on the lock. Held: every package of the lock
    that is installed and not asked for, torch above all."""
    locked = req.lock()
    follow_lock = req.installed_version("torch") is None or _at_lock("torch", locked)
    wanted = [requirement for requirement, _ in missing]
    if follow_lock and own_venv:
        wanted += [requirement for requirement in needed if requirement not in wanted and
                   requirement.name not in req.PROTECTED and not _at_lock(requirement.name, locked)]
    requests = [locked.get(requirement.name, requirement.line) if follow_lock else requirement.line
                for requirement in wanted]
    asked = {requirement.name for requirement in wanted}
    held = []
    for name in locked:
        try:
            held += [] if name in asked else [f"{name}=={metadata.version(name)}"]
        except metadata.PackageNotFoundError:
            continue
    return requests, held


def _at_lock(name: str, locked: dict[str, str]) -> bool:
    try:
        installed = metadata.version(name).split("+")[0]
    except metadata.PackageNotFoundError:
        return False
    return locked.get(name, "").split("==")[-1] == installed


def index_reachable(python: str) -> bool:
    """Whether a connection opens, within PROBE_SECONDS, to the index pip installs from (PIP_INDEX_URL, pip's
    config, else PyPI), through the proxy when one is set. pip's own output cannot say: with retries off it prints
    only that no version was found."""
    listed = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    urls = dict(re.findall(r"^(:env:|install|global)\.index-url='([^']*)'", listed, re.M))
    url = urlsplit(urls.get(":env:") or urls.get("install") or urls.get("global") or PYPI)
    if url.scheme == "file":
        return Path(url.path).is_dir()
    proxy = urllib.request.getproxies().get(url.scheme)
    target = urlsplit(proxy) if proxy and not urllib.request.proxy_bypass(url.hostname or "") else url
    try:
        with socket.create_connection((target.hostname, target.port or (443 if target.scheme == "https" else 80)),
                                      timeout=PROBE_SECONDS):
            return True
    except (OSError, TypeError):  # TypeError: a URL without a host
        return False


def download_command(requests: list[str]) -> str:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"python{version} -m pip download --no-deps -d wheels {' '.join(shlex.quote(item) for item in requests)}"


def failure(log: str, python: str, requests: list[str], wheels: Optional[Path], command: list[str]) -> str:
    """The one line a failed pip install ends in."""
    names = ", ".join(re.split(r"[<>=!~\[]", item, maxsplit=1)[0] for item in requests)
    rerun = f"bash run.sh --wheels wheels {' '.join(command)}".rstrip()
    lacking = NOT_FOUND.findall(log)
    if wheels is not None and lacking:
        return (f"--wheels {wheels} lacks {', '.join(lacking)} (pip looked nowhere else); on a machine with internet "
                f"and this Python run: {download_command(lacking)}, and add what it fetches to {wheels}")
    if wheels is None and not index_reachable(python):
        return (f"cannot reach a package index to install {names} (pip's log: {LOG}); to bring them as wheels, run "
                f"on a machine with internet and this Python (on Kaggle: a notebook with internet on): "
                f"{download_command(requests)}, copy wheels/ here (on Kaggle: attach it as a dataset) and run: {rerun}")
    if "externally-managed-environment" in log:
        return (f"{python} belongs to the system (PEP 668), which lets neither venv nor pip add to it: install "
                f"python3-venv (apt-get install python3-venv) and run again, or run: {python} -m pip install --user "
                f"--break-system-packages {' '.join(shlex.quote(item) for item in requests)}")
    errors = [line.strip() for line in log.splitlines() if line.startswith("ERROR:")]
    return f"installing {names} failed: {errors[-1] if errors else 'see the log'} (pip's log: {LOG})"


def pip_install(python: str, requests: list[str], held: list[str], wheels: Optional[Path], where: str,
                command: list[str], user: bool = False) -> None:
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="held-", delete=False) as constraints:
        constraints.write("".join(f"{line}\n" for line in held))
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "-c", constraints.name, *requests,
           *(["--user"] if user else []),
           *(["--no-index", "--find-links", str(wheels)] if wheels is not None else [])]
    say(f"Installing {' '.join(requests)} into {where}{f' from {wheels}' if wheels else ''} (log: {LOG}).")
    try:
        with open(LOG, "w") as log:
            log.write(f"$ {shlex.join(pip)}\n")
            log.flush()
            done = subprocess.run(pip, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    finally:
        os.unlink(constraints.name)
    if done.returncode:
        raise Stop(failure(LOG.read_text(errors="replace"), python, requests, wheels, command))


def make_venv(python: str) -> Optional[str]:
    """A .venv that sees the system's site-packages, or None where venv cannot make one (no ensurepip)."""
    done = subprocess.run([python, "-m", "venv", "--system-site-packages", str(VENV)], capture_output=True, text=True)
    if done.returncode == 0:
        return str(VENV / "bin" / "python")
    shutil.rmtree(VENV, ignore_errors=True)  # venv leaves a half-made folder behind when ensurepip fails
    lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
    say(f"{python} cannot make a virtual environment ({lines[-1] if lines else 'python -m venv failed'}).")
    return None


def has_pip(python: str) -> bool:
    return subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0


def check(python: str, needs: tuple[str, ...]) -> None:
    """Stop unless `python` now has what the command needs (pip may succeed where its result stays invisible)."""
    done = subprocess.run([python, "-m", "src.environment", "--check", ",".join(needs)], capture_output=True,
                          text=True, cwd=REPO)
    if done.returncode:
        raise Stop(f"the install finished but {python} still lacks {done.stderr.strip() or 'packages'}")


def prepare(python: str, needs: tuple[str, ...], wheels: Optional[Path], command: list[str]) -> str:
    """The Python to run `command` with: `python` when it has what the command needs, else where the missing
    packages were installed."""
    needed = req.needed(needs)
    missing = req.unmet(needed)
    if not missing:
        return python
    say(f"{python} lacks what `{' '.join(command[:1])}` needs: {req.describe(missing)}.")
    for requirement, version in missing:
        if requirement.name in req.PROTECTED and version is not None:
            raise Stop(f"{python} has {requirement.name} {version}, outside the tested range {requirement.spec}, "
                       f"and an installed {requirement.name} is never replaced here: install one in range for this "
                       "platform (https://pytorch.org/get-started/locally/), or point PYTHON at a Python that has one")
    if wheels is not None and not wheels.is_dir():
        raise Stop(f"--wheels {wheels}: no such folder")
    if in_virtual_environment():
        requests, held = install_plan(needed, missing, own_venv=Path(sys.prefix).resolve() == VENV.resolve())
        pip_install(python, requests, held, wheels, f"{python} (a virtual environment)", command)
        check(python, needs)
        return python
    venv = make_venv(python)
    if venv is not None:
        requests, held = install_plan(needed, missing, own_venv=True)
        try:
            pip_install(venv, requests, held, wheels, f"{VENV} (it sees {python}'s packages)", command)
            check(venv, needs)
        except Stop:
            shutil.rmtree(VENV, ignore_errors=True)
            raise
        return venv
    requests, held = install_plan(needed, missing)
    if site.ENABLE_USER_SITE and has_pip(python):
        pip_install(python, requests, held, wheels, f"the user site {site.getusersitepackages()}", command, user=True)
        check(python, needs)
        return python
    raise Stop(f"{python} can make no virtual environment and cannot install into the user site; install "
               f"python3-venv (apt-get install python3-venv) and run again, or install into a Python of your choice "
               f"and name it: pip install {' '.join(shlex.quote(item) for item in requests)}; PYTHON=/that/python "
               f"bash run.sh {' '.join(command)}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.environment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="how run.sh names this Python (printed back)")
    parser.add_argument("--wheels", default=os.environ.get(WHEELS_VARIABLE) or None,
                        help=f"install from this folder of wheels alone (default: ${WHEELS_VARIABLE})")
    parser.add_argument("--check", metavar="GROUPS", help="only say whether this Python has these groups")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command line run.sh was given")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if args.check is not None:
            missing = req.unmet(req.needed(tuple(args.check.split(","))))
            if missing:
                print(req.describe(missing), file=sys.stderr)
            return 1 if missing else 0
        wheels = Path(args.wheels).expanduser().resolve() if args.wheels else None
        print(prepare(args.python, needs_of(command), wheels, command))
    except (Stop, UserError) as error:
        say(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
