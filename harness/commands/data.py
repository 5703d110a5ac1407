"""`harness data prepare NAME [--from PATH] [--out DIR]`: raw data set -> canonical file.

Reads MNIST IDX files, CIFAR-10 binary batches, SVHN MAT-files or the bundled
scikit-learn digits with `datafiles` (numpy only, no torch) and writes the
one canonical `.npz` per data set that devices read, with its checksum.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessUsageError

PREPARABLE = ("digits", "mnist", "cifar10", "svhn")


@dataclass(frozen=True)
class PreparedDataset:
    name: str
    path: Path
    sha256: str  # of the file's bytes (what devices check)
    content_sha256: str  # of the arrays (what the file holds)
    train_size: int
    test_size: int


def prepare_dataset(name: str, source: Path | None, out_dir: Path) -> PreparedDataset:
    """Write `out_dir/<name>.npz` from the raw files in `source` (None: built-in digits)."""
    from contract.checksum import file_sha256
    from contract.errors import UsageError
    from datafiles import load_dataset
    from datafiles.canonical import canonical_filename, write_canonical

    if name not in PREPARABLE:
        raise HarnessUsageError(
            f"unknown data set {name!r}; choose one of: {', '.join(PREPARABLE)}"
        )
    if source is None and name != "digits":
        raise HarnessUsageError(f"data set {name!r} needs --from PATH (its raw files)")
    try:
        dataset = load_dataset(name, source)
    except UsageError as exc:
        raise HarnessUsageError(f"{source or name}: {exc}") from exc
    path = Path(out_dir) / canonical_filename(name)
    content = write_canonical(dataset, path)
    return PreparedDataset(
        name,
        path,
        file_sha256(path),
        content,
        int(dataset.train_images.shape[0]),
        int(dataset.test_images.shape[0]),
    )


def _prepare(args: argparse.Namespace) -> int:
    prepared = prepare_dataset(args.name, args.source, args.out)
    record = {
        "name": prepared.name,
        "path": str(prepared.path),
        "sha256": prepared.sha256,
        "content_sha256": prepared.content_sha256,
        "train_size": prepared.train_size,
        "test_size": prepared.test_size,
    }
    if args.format == "json":
        print(json.dumps(record))
    else:
        print(
            f"{prepared.path}  sha256 {prepared.sha256}  "
            f"({prepared.train_size} train / {prepared.test_size} test)"
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare data sets for devices")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    prepare = commands.add_parser("prepare", help="turn a raw data set into its canonical file")
    prepare.add_argument("name", help=f"one of: {', '.join(PREPARABLE)}")
    prepare.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=None,
        help="directory of the raw files (not needed for digits)",
    )
    prepare.add_argument(
        "--out",
        type=Path,
        default=Path("data"),
        help="directory for the canonical file (default: ./data)",
    )
    prepare.add_argument("--format", choices=("text", "json"), default="text")
    prepare.set_defaults(handler=_prepare)
