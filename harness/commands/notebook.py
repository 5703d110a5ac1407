"""`harness notebook NAME [RUN] [--out DIR] [-p KEY VALUE]`: execute an analysis notebook on a run.

The notebooks in `analysis/notebooks/` are parameterised with papermill (their first
code cell is tagged `parameters`; `run_dir` is the run). `harness notebook overview
runs/ID` executes `overview.ipynb` with `run_dir=runs/ID` into `runs/ID/report/overview.ipynb`
(outputs and figures kept in the copy, the shipped notebook untouched). Without RUN it
uses `runs/latest`, which `harness run` points at the newest run.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from harness.errors import HarnessError, HarnessUsageError
from harness.exit_codes import ExitStatus

LATEST = Path("runs") / "latest"


def notebooks() -> dict[str, Path]:
    """The shipped notebooks by name."""
    folder = Path(str(resources.files("analysis") / "notebooks"))
    return {p.stem: p for p in sorted(folder.glob("*.ipynb"))}


def run_notebook(name: str, run_dir: Path, out_dir: Path | None = None,
                 parameters: dict[str, str] | None = None, timeout_s: float = 1800) -> Path:
    """Execute notebook `name` against `run_dir` with papermill; returns the executed copy."""
    available = notebooks()
    if name not in available:
        raise HarnessUsageError(
            f"notebook: unknown {name!r}; choose one of: {', '.join(available)}"
        )
    if not (run_dir / "run.sqlite").is_file():
        hint = " (`harness run` creates it)" if run_dir == LATEST else ""
        raise HarnessUsageError(f"{run_dir}: no run.sqlite (not a run directory){hint}")
    import papermill
    from papermill.exceptions import PapermillExecutionError

    out_dir = out_dir or run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / f"{name}.ipynb"
    try:
        papermill.execute_notebook(
            str(available[name]),
            str(output),
            parameters={"run_dir": str(run_dir.resolve()), **(parameters or {})},
            kernel_name="python3",
            cwd=str(out_dir),
            progress_bar=False,
            execution_timeout=timeout_s,
        )
    except PapermillExecutionError as exc:
        raise HarnessError(
            f"notebook {name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue} "
            f"(the executed notebook with the traceback: {output})"
        ) from None
    return output


def _notebook(args: argparse.Namespace) -> int:
    parameters = dict(args.parameter or [])
    path = run_notebook(args.name, Path(args.run), Path(args.out) if args.out else None,
                        parameters)
    print(path)
    return ExitStatus.OK


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "notebook", help="execute an analysis notebook on a run (papermill) into its report folder"
    )
    parser.add_argument("name", help="notebook name (overview, method_comparison, power_trace, "
                                     "reproduction)")
    parser.add_argument("run", nargs="?", default=str(LATEST),
                        help="run directory (default: runs/latest, the newest run)")
    parser.add_argument("--out", help="output directory (default: RUN/report)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("KEY", "VALUE"),
                        help="another notebook parameter (a string), e.g. -p baseline lowmem")
    parser.set_defaults(handler=_notebook)
