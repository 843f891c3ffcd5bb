"""What each part of the repository needs, read from the requirement files: requirements.txt is the core (what trains,
predicts and exports), requirements/GROUP.txt an optional group (tracking, tuning, style, explain, tests), each line a range
the code is tested with; requirements/lock.txt pins the exact version of every one of them (CI, a fresh .venv).

Standard library only (and the `packaging` that pip carries), so run.sh can ask before anything is installed."""
from __future__ import annotations

import importlib
import re
import shlex
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Optional

from .errors import UserError
from .paths import REPO

CORE = "core"
EVERY_GROUP = "all"  # a command's needs: every group (the test suite)
CORE_FILE = REPO / "requirements.txt"
GROUP_DIR = REPO / "requirements"
LOCK_FILE = GROUP_DIR / "lock.txt"
# Never replaced by an install: the platform's build (CUDA, ROCm, NGC) is reused, or the command stops.
PROTECTED = ("torch",)
# Distributions that install the same module as the one a line names: any of them satisfies that line (installing
# the line's own beside one of them would give two packages owning `cv2`).
ALTERNATIVES = {"opencv-python-headless": ("opencv-python", "opencv-contrib-python", "opencv-contrib-python-headless")}
_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(.*)$")


@dataclass(frozen=True)
class Requirement:
    line: str  # as written, e.g. "psycopg[binary]>=3.3.9,<4"
    name: str  # the distribution, normalised: "psycopg"
    spec: str  # ">=3.3.9,<4"
    group: str


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them (PyYAML == pyyaml, scikit_learn == scikit-learn)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: Path, group: str) -> list[Requirement]:
    found = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if not match:
            raise UserError(f"{path}:{number}: '{line}' is not a requirement (name[extras] followed by a range)")
        found.append(Requirement(line, normalise(match.group(1)), match.group(3).replace(" ", ""), group))
    return found


def groups() -> dict[str, list[Requirement]]:
    """Every group's requirements: the core first, then requirements/*.txt by name (the lock is not a group)."""
    found = {CORE: read_requirements(CORE_FILE, CORE)}
    for path in sorted(GROUP_DIR.glob("*.txt")):
        if path != LOCK_FILE:
            found[path.stem] = read_requirements(path, path.stem)
    return found


def needed(names: tuple[str, ...] | list[str]) -> list[Requirement]:
    """The requirements of the named groups (EVERY_GROUP: all of them), the core always included."""
    every = groups()
    chosen = list(every) if EVERY_GROUP in names else [CORE, *(name for name in names if name != CORE)]
    unknown = [name for name in chosen if name not in every]
    if unknown:
        raise UserError(f"no requirement group {', '.join(unknown)}; the groups are {', '.join(every)} "
                        f"(requirements.txt and {GROUP_DIR.name}/*.txt)")
    return [requirement for name in chosen for requirement in every[name]]


def lock() -> dict[str, str]:
    """The lock's line of every distribution, by normalised name: {"torch": "torch==2.14.1", ...}."""
    return {requirement.name: requirement.line for requirement in read_requirements(LOCK_FILE, "lock")}


def installed_version(name: str) -> Optional[str]:
    """The version of the distribution `name` (or of one that installs the same module) this Python sees."""
    for candidate in (name, *ALTERNATIVES.get(name, ())):
        try:
            return metadata.version(candidate)
        except metadata.PackageNotFoundError:
            continue
    return None


def _packaging():
    """packaging's SpecifierSet and Version: the package itself where installed, else the copy inside pip."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ImportError:
        from pip._vendor.packaging.specifiers import SpecifierSet
        from pip._vendor.packaging.version import Version
    return SpecifierSet, Version


def in_range(version: str, spec: str) -> bool:
    """Whether an installed `version` satisfies `spec`. A pre-release or local build counts as its release: NGC's
    torch 2.11.0a0+git1234 is a 2.11 (a range's floor would otherwise exclude the platform's own build)."""
    specifier_set, version_class = _packaging()
    try:
        release = version_class(version).base_version
    except ValueError:  # not PEP 440 (a hand-made build): it cannot be placed in any range
        return False
    return specifier_set(spec).contains(release, prereleases=True)


def unmet(requirements: list[Requirement]) -> list[tuple[Requirement, Optional[str]]]:
    """The requirements this Python does not satisfy, with the version it has (None: not installed)."""
    found = []
    for requirement in requirements:
        version = installed_version(requirement.name)
        if version is None or not in_range(version, requirement.spec):
            found.append((requirement, version))
    return found


def describe(unmet_requirements: list[tuple[Requirement, Optional[str]]]) -> str:
    """'timm (not installed), numpy 1.21.0 (outside >=1.26,<3)'."""
    return ", ".join(f"{requirement.name} (not installed)" if version is None else
                     f"{requirement.name} {version} (outside {requirement.spec})"
                     for requirement, version in unmet_requirements)


def pip_line(package: str) -> str:
    """`pip install 'optuna>=5.0,<6'`: the package at the range its group states (its bare name outside a clone)."""
    wanted = normalise(package)
    try:
        line = next((requirement.line for group in groups().values() for requirement in group
                     if requirement.name == wanted), package)
    except OSError:  # no requirement files beside the code
        line = package
    return f"pip install {shlex.quote(line)}"


def require(module: str, package: str, purpose: str) -> ModuleType:
    """Import `module`, or stop with one line: what needs it, the package and the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name not in (module, module.split(".")[0]):
            raise  # installed, but something it imports is broken: pip's own message says more than ours
        raise UserError(f"{purpose} needs the package {package}, which is not installed; run: "
                        f"{pip_line(package)}") from None
