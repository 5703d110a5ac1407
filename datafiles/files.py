"""Finding and reading the raw files of a data set: gzip or not, checked against SHA256SUMS."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

from contract.checksum import file_sha256
from contract.errors import UsageError

SUMS_FILE = "SHA256SUMS"


def find_file(directory: Path, name: str, what: str) -> Path:
    """`directory/name` or `directory/name.gz`, whichever exists; else a UsageError naming both."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise UsageError(f"{what}: file {directory / name} (or {name}.gz) not found")


def read_sums(directory: Path) -> dict[str, str]:
    """The `sha256sum` listing in `directory/SHA256SUMS` as {file name: hex digest}, or {}."""
    sums_path = directory / SUMS_FILE
    if not sums_path.is_file():
        return {}
    sums: dict[str, str] = {}
    for number, line in enumerate(sums_path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise UsageError(f"{sums_path}: line {number} is not '<sha256>  <file>': {line!r}")
        sums[parts[1].lstrip("*").strip()] = parts[0].lower()
    return sums


def verify_checksum(path: Path) -> None:
    """Compare `path` with its entry in SHA256SUMS beside it (if that file lists it)."""
    expected = read_sums(path.parent).get(path.name)
    if expected is None:
        return
    actual = file_sha256(path)
    if actual != expected:
        raise UsageError(
            f"{path}: sha256 {actual} does not match {expected} in {path.parent / SUMS_FILE}"
        )


def read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it ends in .gz, after the SHA256SUMS check."""
    verify_checksum(path)
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise UsageError(f"{path}: not a valid gzip file ({exc})") from None
