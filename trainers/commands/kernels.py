"""`python -m trainers kernels build|status`: the fused C++ kernels of this machine.

`build` compiles them into the cache of `trainers.kernel_cache` unless they are there (one
compiler job, refused with exit 1 and a reason when memory is short); `status` says whether
they are built for these sources, flags and torch version, without building. Both print one
JSON object as the last line of stdout with `--format json`; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_OK, EXIT_ERROR = 0, 1


def _say(message: str) -> None:
    print(f"[kernels] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from trainers import kernel_cache

    if args.action == "status":
        info = kernel_cache.describe()
        code = EXIT_OK
    else:
        from trainers import native

        info = kernel_cache.describe()
        if info["built"]:
            _say(f"already built: {info['directory']}")
        try:
            native.build(progress=_say)
            info = kernel_cache.describe()
            info["build_seconds"] = round(native.build_seconds, 1)
            code = EXIT_OK
        except kernel_cache.KernelBuildRefused as exc:
            info["error"] = str(exc)
            code = EXIT_ERROR
        except Exception as exc:  # compiler or headers missing: say so, in one line
            text = str(exc).strip()
            info["error"] = f"build failed: {type(exc).__name__}: " + (
                text.splitlines()[-1] if text else "")
            code = EXIT_ERROR
        if "error" in info:
            _say(info["error"])
    if args.format == "json":
        print(json.dumps(info))
    else:
        state = "built" if info["built"] else "not built"
        print(f"kernels {state}: key {info['key']} (torch {info['torch']}, flags "
              f"{' '.join(info['flags'])})\n  {info['directory']}")
    return code


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("kernels", help="build the fused C++ kernels, or say whether "
                                   "they are built")
    parser.add_argument("action", choices=("build", "status"))
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.set_defaults(handler=run)
