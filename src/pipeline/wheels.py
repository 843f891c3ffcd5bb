"""A wheel rebuilt from an installed pure-Python distribution, offline and from the very files that ran here: what
an export bundle carries for the packages Kaggle's stock image lacks (a wheel is the format's own zip of the
package's files and its .dist-info, with a RECORD of their sha256 digests: PEP 427)."""
from __future__ import annotations

import base64
import hashlib
import re
import zipfile
from importlib import metadata
from pathlib import Path

from ..core.errors import UserError
from ..core.files import atomic_path

NOT_PACKED = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}  # what an installer adds; RECORD is rewritten


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def wheel_of_installed(name: str, out_dir: Path) -> Path:
    """OUT_DIR/NAME-VERSION-TAG.whl of the installed distribution `name`, which must be pure Python."""
    dist = metadata.distribution(name)
    wheel = dist.read_text("WHEEL") or ""
    tags = re.findall(r"^Tag:\s*(\S+)", wheel, re.M)
    if "Root-Is-Purelib: true" not in wheel or not tags or any(not tag.endswith("-none-any") for tag in tags):
        raise UserError(f"{name} is not a pure-Python package ({tags or 'no WHEEL tags'}); a bundle carries only "
                        "those as wheels")
    files = [path for path in dist.files or [] if not str(path).startswith("..") and "__pycache__" not in path.parts]
    info = next(path.parts[0] for path in files if path.parts[0].endswith(".dist-info"))
    python_tags = ".".join(dict.fromkeys(tag.split("-")[0] for tag in tags))
    escaped = re.sub(r"[^\w.]+", "_", dist.metadata["Name"])
    target = out_dir / f"{escaped}-{dist.version}-{python_tags}-none-any.whl"
    record = []
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(files, key=str):
            if path.parts[0] == info and path.name in NOT_PACKED:
                continue
            data = Path(path.locate()).read_bytes()
            archive.writestr(path.as_posix(), data)
            record.append(f"{path.as_posix()},{_digest(data)},{len(data)}")
        archive.writestr(f"{info}/RECORD", "".join(f"{line}\n" for line in [*record, f"{info}/RECORD,,"]))
    return target
