"""DALI's wheels carried as parts: ``benchmarks/gpu_wheels.sh --dali --split 57`` writes them as one tar in parts of
at most 57 MiB (for GPU nodes that take files in limited sizes) with the sha256 of each part and of the joined tar;
the GPU check's install step (gpu_check_steps.install) verifies, joins and extracts them here. Standard library
only: the check runs it before anything is installed.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
from pathlib import Path

# benchmarks/gpu_wheels.sh --dali --split: DALI's wheels as one tar in parts (00, 01, ...), and the sha256 of each
# part and of the joined tar
DALI_TAR, DALI_SUMS = "dali-wheels.tar", "dali-wheels.sha256"
DALI_PARTS = DALI_TAR + ".part-"
REMAKE = ("remake them with `benchmarks/gpu_wheels.sh --dali --split 57 DIR` where pip reaches PyPI and carry every "
          f"{DALI_PARTS}* file and {DALI_SUMS}")


class WheelsError(Exception):
    """DALI's parts in the wheel folder are missing, incomplete or corrupt (the install step fails with this)."""


def _checksums(folder: Path) -> dict[str, str]:
    """File name -> sha256, from the folder's DALI_SUMS (sha256sum's format)."""
    path = folder / DALI_SUMS
    if not path.is_file():
        raise WheelsError(f"{path}: missing (the sha256 of DALI's parts); {REMAKE}")
    sums = {}
    for line in path.read_text(errors="replace").splitlines():
        if m := re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line.strip()):
            sums[m[2]] = m[1]
    if DALI_TAR not in sums or not any(name.startswith(DALI_PARTS) for name in sums):
        raise WheelsError(f"{path}: no sha256 of {DALI_TAR} and its parts; {REMAKE}")
    return sums


def dali_wheels(folder: Path, scratch: Path) -> list[Path]:
    """DALI's wheels from gpu_wheels.sh --split's parts in the wheel folder, or from a DALI_TAR joined there by hand:
    each part and the joined tar checked against DALI_SUMS, the parts joined in name order, the wheels extracted
    into scratch. [] where the folder has none of these files, or only DALI_SUMS beside DALI's wheels unpacked by
    hand (plain wheels in the folder install with the others). WheelsError, naming the file, for a missing
    checksum file, a part it lists that is missing, a part it does not list, or a wrong checksum."""
    parts, joined = sorted(folder.glob(DALI_PARTS + "*")), folder / DALI_TAR
    if not parts and not joined.is_file() and not (folder / DALI_SUMS).is_file():
        return []
    sums = _checksums(folder)
    listed = sorted(name for name in sums if name.startswith(DALI_PARTS))
    if not parts and not joined.is_file():
        if any(folder.glob("nvidia_dali*.whl")):
            return []
        raise WheelsError(f"{folder / listed[0]}: missing, and all the other parts {DALI_SUMS} lists; {REMAKE}")
    scratch.mkdir(parents=True, exist_ok=True)
    if parts:
        if missing := [name for name in listed if not (folder / name).is_file()]:
            raise WheelsError(f"{folder / missing[0]}: missing ({len(missing)} of the {len(listed)} parts {DALI_SUMS} "
                              f"lists are not there); {REMAKE}")
        if extra := [p for p in parts if p.name not in sums]:
            raise WheelsError(f"{extra[0]}: a part {DALI_SUMS} does not list (from another run?); {REMAKE}")
        whole, tar = hashlib.sha256(), scratch / DALI_TAR
        with tar.open("wb") as out:
            for part in parts:  # each under 57 MiB
                data = part.read_bytes()
                if hashlib.sha256(data).hexdigest() != sums[part.name]:
                    raise WheelsError(f"{part}: wrong sha256 (not the part {DALI_SUMS} lists: corrupt or from "
                                      f"another run); {REMAKE}")
                whole.update(data)
                out.write(data)
        if whole.hexdigest() != sums[DALI_TAR]:
            raise WheelsError(f"{tar} (joined from {len(parts)} parts): wrong sha256; {REMAKE}")
        print(f"gpu_check: verified {' '.join(p.name for p in parts)} and the {DALI_TAR} they join into", flush=True)
    else:
        tar = joined
        with tar.open("rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() != sums[DALI_TAR]:
                raise WheelsError(f"{tar}: wrong sha256 (not the tar {DALI_SUMS} lists); {REMAKE}")
        print(f"gpu_check: {tar} (joined by hand) verified", flush=True)
    with tarfile.open(tar) as archive:
        if bad := [m.name for m in archive if not (m.isfile() and "/" not in m.name and m.name.endswith(".whl"))]:
            raise WheelsError(f"{tar}: holds {bad[0]}, not a wheel file (it has only wheels); {REMAKE}")
        archive.extractall(scratch / "wheels", filter="data")
    if tar.parent == scratch:
        tar.unlink()  # 250 MB of scratch
    return sorted((scratch / "wheels").glob("*.whl"))
