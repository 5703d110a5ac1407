"""The Debian bookworm arm64 root behind the lab's emulated arm64 devices, built once per machine.

A Raspberry Pi runs aarch64 Debian (Raspberry Pi OS Bookworm: Python 3.11). The lab gets
the same userland without the hardware: `debootstrap --arch=arm64` builds a Debian
bookworm root, and the kernel runs its aarch64 programs through qemu-user, registered with
binfmt_misc (flag F: the interpreter is opened once at registration, so nothing of qemu's
needs to live inside the root). Every program in the root, sshd, Python, g++ and torch, is
aarch64 code, emulated instruction by instruction: it works like a Pi, at a speed that is
nobody's (figures from it are labelled emulated).

The build is cached under `cache_dir/arm64-bookworm-<key>/root`, where the key hashes
everything the build installs, and is done once per machine: into a staging directory
first, renamed when complete (an interrupted build is never used, and is removed by the
next), under a lock (two `lab up`s build once). Steps, each reported as it runs:

1. debootstrap (Python 3.11, python3-dev, g++, ninja, openssh-server) from the host's own
   Debian mirror, read from its apt configuration (`--mirror` overrides);
2. the host's CA bundle, resolver and pip configuration copied in;
3. a venv at `/opt/bnn/venv` (Debian's Python is "externally managed", PEP 668);
4. the device's Python packages, installed by the host's pip for the aarch64 platform (the
   emulated pip would spend minutes resolving what the native one does in seconds):
   torch's aarch64 CPU build and the few pure-Python packages it needs, numpy, psutil;
5. a check that the root's Python imports torch and runs `torch._int_mm`.

All mounts a step needs (/proc, /dev, /sys) are made in a private mount namespace
(`unshare -m`), so they vanish with the step, even when it is killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError, HarnessUsageError

SUITE = "bookworm"
APT_PACKAGES = ("python3", "python3-venv", "python3-dev", "g++", "ninja-build",
                "openssh-server", "procps", "ca-certificates")
# torch 2.10 is the newest release whose aarch64 wheel on the package index is the CPU build:
# from 2.11 on that wheel is a CUDA build that does not import without ~3 GB of nvidia
# packages. The rest is what torch imports (its pure-Python dependencies) and the agent needs.
TORCH_REQUIREMENT = "torch==2.10.0"
PIP_PACKAGES = (TORCH_REQUIREMENT, "filelock", "typing-extensions", "sympy", "mpmath",
                "networkx", "jinja2", "markupsafe", "fsspec", "numpy", "psutil",
                # pytest, to run the engine's own tests on the device (.ci/arm64)
                "pytest", "iniconfig", "packaging", "pluggy", "pygments")
PIP_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
VENV = "/opt/bnn/venv"
PYTHON = f"{VENV}/bin/python"
SITE_PACKAGES = f"{VENV}/lib/python3.11/site-packages"
LAYOUT_VERSION = 1  # bump when the steps change in a way the key does not see
BUILD_RECORD = "build.json"

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_ENTRY = BINFMT_DIR / "qemu-aarch64"
BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
INSTALL_HINT = "apt-get install qemu-user-static binfmt-support debootstrap"
HOST_FILES = ("/etc/resolv.conf", "/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf")
HOST_DIRS = ("/etc/xdg/pip",)

Progress = Callable[[str], None]


def default_cache_dir() -> Path:
    """$BNN_CACHE_DIR, else /var/cache/bnn-harness as root, else ~/.cache/bnn-harness."""
    if os.environ.get("BNN_CACHE_DIR"):
        return Path(os.environ["BNN_CACHE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/cache/bnn-harness")
    return Path.home() / ".cache" / "bnn-harness"


# ------------------------------------------------------------------ the host's mirror

_PLAIN_SUITE = re.compile(r"^[a-z]+$")  # bookworm, stable; not bookworm-security/-updates


def _deb822_mirrors(text: str) -> Iterator[str]:
    for paragraph in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in paragraph.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get(
            "types", ""
        ).split():
            continue
        if any(_PLAIN_SUITE.match(suite) for suite in fields.get("suites", "").split()):
            yield from fields.get("uris", "").split()


def _one_line_mirrors(text: str) -> Iterator[str]:
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb" and _PLAIN_SUITE.match(words[2]):
            yield words[1]


def apt_mirror(etc_apt: Path = Path("/etc/apt")) -> str | None:
    """The Debian mirror this host's apt uses (first `deb` source of a plain suite)."""
    sources = sorted((etc_apt / "sources.list.d").glob("*.sources"))
    lists = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    for path in sources:
        with contextlib.suppress(OSError):
            for uri in _deb822_mirrors(path.read_text()):
                if uri.startswith(("http://", "https://", "file:/")):
                    return uri
    for path in lists:
        with contextlib.suppress(OSError):
            for uri in _one_line_mirrors(path.read_text()):
                if uri.startswith(("http://", "https://", "file:/")):
                    return uri
    return None


# ------------------------------------------------------------------ binfmt_misc


def ensure_binfmt() -> str:
    """Register qemu-user for aarch64 ELF files (if needed) and return how it is registered."""
    if platform.machine() == "aarch64":
        return "native aarch64 (no emulation)"
    if not (BINFMT_DIR / "status").exists():
        if os.geteuid() != 0:
            raise HarnessError(f"binfmt_misc is not mounted at {BINFMT_DIR} (needs root)")
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
                       capture_output=True)
    if not BINFMT_ENTRY.exists():
        if os.geteuid() != 0:
            raise HarnessError("qemu-aarch64 is not registered with binfmt_misc (needs root)")
        if shutil.which("update-binfmts"):
            subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
        if not BINFMT_ENTRY.exists() and BINFMT_CONF.exists():
            (BINFMT_DIR / "register").write_text(BINFMT_CONF.read_text().strip())
    if not BINFMT_ENTRY.exists():
        raise HarnessError(f"cannot register qemu-user for aarch64 with binfmt_misc; "
                           f"{INSTALL_HINT}")
    entry = BINFMT_ENTRY.read_text()
    flags = re.search(r"^flags:\s*(\S*)", entry, re.MULTILINE)
    if not entry.startswith("enabled"):
        raise HarnessError(f"{BINFMT_ENTRY} is disabled; run `update-binfmts --enable "
                           f"qemu-aarch64`")
    if not flags or "F" not in flags.group(1):
        raise HarnessError(f"{BINFMT_ENTRY} lacks flag F (qemu-user-static registers it); "
                           f"{INSTALL_HINT}")
    interpreter = re.search(r"^interpreter\s+(\S+)", entry, re.MULTILINE)
    return f"qemu-user via binfmt_misc ({interpreter.group(1) if interpreter else '?'})"


# ------------------------------------------------------------------ running inside a root


def chroot_argv(root: Path, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """`argv` run inside `root` with /proc, /dev and /sys, in a private mount namespace."""
    script = ('R=$1; shift; mount -t proc proc "$R/proc" && mount --rbind /dev "$R/dev" && '
              'mount -t sysfs sysfs "$R/sys" && exec chroot "$R" "$@"')
    environment = ["env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                   "HOME=/root", "LANG=C.UTF-8",
                   *(f"{k}={v}" for k, v in (env or {}).items())]
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            str(root), *environment, *argv]


@dataclass
class StepTimer:
    progress: Progress
    started: float = 0.0

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self.steps: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        begin = time.monotonic()
        self.progress(f"{name} ...")
        yield
        self.steps[name] = round(time.monotonic() - begin, 1)
        self.progress(f"{name}: done in {self.steps[name]:.0f} s "
                      f"(build at {time.monotonic() - self.started:.0f} s)")


def _stream(argv: list[str], progress: Progress, what: str, every_s: float = 5.0,
            env: dict[str, str] | None = None) -> None:
    """Run `argv`, reporting its latest output line at most every `every_s` seconds; on
    failure raise with the tail of its output."""
    tail: list[str] = []
    last = 0.0
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", env=env) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            if not line:
                continue
            tail = [*tail[-19:], line]
            if time.monotonic() - last >= every_s:
                last = time.monotonic()
                progress(f"  {what}: {line[:120]}")
        code = process.wait()
    if code != 0:
        raise HarnessError(f"{what} failed (exit {code}):\n  " + "\n  ".join(tail[-12:]))


class Arm64Root:
    """The cached root: `ensure()` builds it if needed and returns its path."""

    def __init__(self, cache_dir: Path | None = None, mirror: str | None = None,
                 progress: Progress | None = None) -> None:
        self.cache_dir = Path(cache_dir or default_cache_dir()).resolve()
        self.mirror = mirror
        self.progress: Progress = progress or (lambda message: None)

    @property
    def key(self) -> str:
        spec = json.dumps([LAYOUT_VERSION, SUITE, APT_PACKAGES, PIP_PACKAGES, PIP_PLATFORMS])
        return hashlib.sha256(spec.encode()).hexdigest()[:12]

    @property
    def directory(self) -> Path:
        return self.cache_dir / f"arm64-{SUITE}-{self.key}"

    @property
    def root(self) -> Path:
        return self.directory / "root"

    def ready(self) -> bool:
        return (self.directory / BUILD_RECORD).is_file()

    def record(self) -> dict:
        return json.loads((self.directory / BUILD_RECORD).read_text())

    def ensure(self) -> Path:
        """The root's path, building it first if this machine has none yet."""
        if self.ready():
            return self.root
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        lock_path = self.cache_dir / f"{self.directory.name}.lock"
        with open(lock_path, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.progress(f"another process is building {self.directory}; waiting")
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not self.ready():
                self._build()
        return self.root

    # -------------------------------------------------------------- the build

    def _preflight(self) -> str:
        if os.geteuid() != 0:
            raise HarnessError("building the arm64 root needs root (debootstrap, chroot, "
                               "mounts); run `harness lab up --arch arm64` as root once, "
                               f"or point --cache at a root built before ({self.cache_dir})")
        missing = [tool for tool in ("debootstrap", "unshare", "chroot")
                   if shutil.which(tool) is None]
        if missing:
            raise HarnessError(f"{', '.join(missing)} not found; {INSTALL_HINT}")
        mirror = self.mirror or apt_mirror()
        if mirror is None:
            raise HarnessUsageError("--mirror: no Debian mirror in this host's apt "
                                    "configuration (/etc/apt/sources.list[.d]); give one")
        return mirror

    def _build(self) -> None:
        mirror = self._preflight()
        emulation = ensure_binfmt()
        timer = StepTimer(self.progress)
        staging = self.cache_dir / f".{self.directory.name}.partial"
        if staging.exists():
            self.progress(f"removing an unfinished build ({staging})")
            shutil.rmtree(staging)
        root = staging / "root"
        root.mkdir(parents=True)
        self.progress(f"building the arm64 root in {self.directory} (once per machine; "
                      f"~15-30 min, mostly emulated package set-up)")
        with timer.step(f"debootstrap {SUITE} arm64 from {mirror}"):
            script = 'exec debootstrap "$@"'
            _stream(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                     "--arch=arm64", "--variant=minbase",
                     f"--include={','.join(APT_PACKAGES)}", SUITE, str(root), mirror],
                    self.progress, "debootstrap")
        with timer.step("host files (CA bundle, resolver, pip configuration)"):
            copied = self._copy_host_files(root)
        with timer.step(f"venv {VENV}"):
            _stream(chroot_argv(root, ["/usr/bin/python3", "-m", "venv", VENV]),
                    self.progress, "venv")
        with timer.step(f"pip: {' '.join(PIP_PACKAGES)} (aarch64 wheels)"):
            self._pip_install(root)
        with timer.step("check: the root's Python imports torch and runs torch._int_mm"):
            check = subprocess.run(
                chroot_argv(root, [PYTHON, "-c", _CHECK_SCRIPT]),
                capture_output=True, text=True, timeout=1800,
            )
            if check.returncode != 0:
                raise HarnessError(f"the arm64 root's Python cannot use torch: "
                                   f"{check.stderr.strip()[-600:]}")
            facts = json.loads(check.stdout.strip().splitlines()[-1])
        record = {
            "key": self.key, "suite": SUITE, "mirror": mirror, "emulation": emulation,
            "apt_packages": list(APT_PACKAGES), "pip_packages": list(PIP_PACKAGES),
            "host_files": copied, "python": PYTHON, **facts,
            "site_packages_bytes": _tree_bytes(root / SITE_PACKAGES.lstrip("/")),
            "root_bytes": _tree_bytes(root),
            "step_seconds": timer.steps,
            "build_seconds": round(time.monotonic() - timer.started, 1),
            "built_host_s": time.time(),
        }
        (staging / BUILD_RECORD).write_text(json.dumps(record, indent=1))
        if self.directory.exists():
            shutil.rmtree(self.directory)
        staging.rename(self.directory)
        self.progress(f"arm64 root ready in {record['build_seconds'] / 60:.1f} min: "
                      f"{self.root} ({record['root_bytes'] / 2**20:,.0f} MiB; torch "
                      f"{record['torch']} {record['machine']})")

    def _copy_host_files(self, root: Path) -> list[str]:
        copied = []
        for name in HOST_FILES:
            source = Path(name)
            if source.is_file():
                target = root / name.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)  # resolv.conf may be a dangling symlink
                shutil.copyfile(source, target)
                copied.append(name)
        for name in HOST_DIRS:
            if Path(name).is_dir():
                shutil.copytree(name, root / name.lstrip("/"), dirs_exist_ok=True)
                copied.append(name)
        return copied

    def _pip_install(self, root: Path) -> None:
        argv = [sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary=:all:",
                "--target", str(root / SITE_PACKAGES.lstrip("/")), "--upgrade",
                "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
                "--progress-bar", "off",
                *(f"--platform={p}" for p in PIP_PLATFORMS), *PIP_PACKAGES]
        _stream(argv, self.progress, "pip")


_CHECK_SCRIPT = """
import json, platform, sys, torch
a = torch.ones(8, 16, dtype=torch.int8)
assert int(torch._int_mm(torch.ones(32, 16, dtype=torch.int8), a.t().contiguous())[0, 0]) == 16
print(json.dumps({"machine": platform.machine(), "python_version": platform.python_version(),
                  "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                  "cpu_capability": torch.backends.cpu.get_cpu_capability()}))
"""


def _tree_bytes(path: Path) -> int:
    total = 0
    for directory, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(directory, name)).st_size
    return total
