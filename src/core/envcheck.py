"""Exit 0 when this Python has the packages of requirements.txt (exact pins at their pinned version), else 1.

Standard library only: run.sh calls it before anything is installed, to decide whether to build .venv.
"""
from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path


def unmet_requirements(requirements: Path) -> list[str]:
    unmet = []
    for raw in requirements.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = re.split(r"[<>=!~ ;\[]", line, maxsplit=1)[0]
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{name} (not installed)")
            continue
        pin = re.search(r"==\s*([^,;\s]+)", line)
        if pin and installed.split("+")[0] != pin.group(1):
            unmet.append(f"{name} ({installed} installed, {pin.group(1)} pinned)")
    return unmet


if __name__ == "__main__":
    missing = unmet_requirements(Path(sys.argv[1] if len(sys.argv) > 1 else "requirements.txt"))
    if missing and "--verbose" in sys.argv:
        print("missing: " + ", ".join(missing))
    sys.exit(1 if missing else 0)
