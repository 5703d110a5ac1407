"""Fetch the raw files of MNIST, CIFAR-10 or SVHN on a machine that has internet access.

Optional: nothing at run time needs it (devices read prepared files). Every download is
checked against the published digest before it is renamed into place, and only the
expected members of the CIFAR-10 archive are extracted (no paths from the archive used).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from contract.errors import UsageError, unknown_choice


@dataclass(frozen=True)
class Source:
    url: str
    file_name: str
    algorithm: str  # hashlib name of the published digest
    digest: str


MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
SOURCES: dict[str, tuple[Source, ...]] = {
    "mnist": tuple(
        Source(MNIST_MIRROR + name, name, "sha256", digest)
        for name, digest in (
            (
                "train-images-idx3-ubyte.gz",
                "db8f937d487057fb14a9f0fbe97f0bc8d311ab41b750d41e1ff37c43b9e55e19",
            ),
            (
                "train-labels-idx1-ubyte.gz",
                "51fc562b6747b666fbf6e84ce29d43c3cb5f9c388c664d43b33f02095313405a",
            ),
            (
                "t10k-images-idx3-ubyte.gz",
                "cfeddb84311ecf044fc6a5b0f6ee8a24d265d4e83e388400186eb114082f4209",
            ),
            (
                "t10k-labels-idx1-ubyte.gz",
                "e41c74e484045d39b462a7790a4af51301bd9b0b24f0154798d713ec68c45920",
            ),
        )
    ),
    "cifar10": (
        Source(
            "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
            "cifar-10-binary.tar.gz",
            "md5",
            "c32a1d4ab5d03f1284b67883e8d87530",
        ),
    ),
    "svhn": (
        Source(
            "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
            "train_32x32.mat",
            "md5",
            "e26dedcc434d2e4c54c9b2d4a06d8373",
        ),
        Source(
            "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
            "test_32x32.mat",
            "md5",
            "eb5a983be6a315427106f1b164d9cef3",
        ),
    ),
}
CIFAR_MEMBERS = (*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin")


def _fetch(source: Source, directory: Path, timeout_s: float) -> Path:
    """Download one file to a temp name, check its digest, rename it into place."""
    target = directory / source.file_name
    if target.is_file():
        return target
    digest = hashlib.new(source.algorithm)
    fd, temp_name = tempfile.mkstemp(prefix=f".{source.file_name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(source.url, timeout=timeout_s) as r:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != source.digest:
            raise UsageError(
                f"{source.url}: {source.algorithm} {digest.hexdigest()} does not match the "
                f"published {source.digest}"
            )
        os.replace(temp_name, target)
    finally:
        Path(temp_name).unlink(missing_ok=True)
    return target


def _extract_cifar(archive: Path, directory: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        members = {Path(member.name).name: member for member in tar.getmembers() if member.isfile()}
        for name in CIFAR_MEMBERS:
            if name not in members:
                raise UsageError(f"{archive}: member {name!r} missing")
            stream = tar.extractfile(members[name])
            (directory / name).write_bytes(stream.read())


def download(name: str, directory: str | Path, timeout_s: float = 60.0) -> Path:
    """Put the raw files of data set `name` into `directory` (skipping files already there)."""
    if name not in SOURCES:
        raise unknown_choice("downloadable dataset", name, SOURCES)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for source in SOURCES[name]:
        path = _fetch(source, directory, timeout_s)
        if name == "cifar10" and not all((directory / m).is_file() for m in CIFAR_MEMBERS):
            _extract_cifar(path, directory)
    return directory
