"""Dashboard latency: from a power sample handed to the run store to it drawn in a browser.

N emulated devices each hand the store R power samples a second (and memory samples and
an epoch boundary every few seconds), through the store's public API from one thread per
device as the runner and recorders do. Each sample's `t_host_s` is the moment it is handed
over. The dashboard serves the run; headless Chromium (Debian's /usr/bin/chromium) shows
the page, which stamps every sample when it first draws it (`window.dashboard.latencies`:
draw time minus `t_host_s`, same machine clock). Prints the distribution; exit 1 when the
median is not under the target.

    python benchmarks/dashboard_latency.py [--devices 16] [--rate-hz 10] [--seconds 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from playwright.sync_api import sync_playwright

from harness.dashboard import start_dashboard
from harness.store import MemorySample, PlannedJob, RunStore

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TARGET_MEDIAN_S = 1.0
EPOCH_S = 5.0


@dataclass(frozen=True)
class PowerSample:
    t_host_s: float
    power_w: float
    volts: float
    amps: float
    t_meter_s: float | None = None


def feed(store: RunStore, device: str, rate_hz: float, stop: threading.Event) -> int:
    """One device: power at `rate_hz`, memory at half of it, an epoch every EPOCH_S."""
    job_id = f"job-{device}"
    start = time.time()
    store.start_job(job_id, device, 1, start)
    sent = 0
    epoch, epoch_start = 1, start
    next_t = time.monotonic()
    while not stop.is_set():
        now = time.time()
        watts = 3.0 + (sent % 20) / 10
        store.add_power_samples(device, "um25c", [PowerSample(now, watts, 5.1, watts / 5.1)])
        if sent % 2 == 0:
            rss = 200_000_000 + sent * 1000
            store.add_memory_samples(
                [MemorySample(device, job_id, 1, sent, now, now, 0, rss, rss, None, None, sent)]
            )
        if now - epoch_start >= EPOCH_S:
            store.add_phase(device, job_id, 1, "epoch", epoch, epoch_start, now)
            epoch, epoch_start = epoch + 1, now
        sent += 1
        next_t += 1.0 / rate_hz
        stop.wait(max(0.0, next_t - time.monotonic()))
    store.finish_job(job_id, "completed", 0, None, time.time())
    return sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=16)
    parser.add_argument("--rate-hz", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "latency"
        store = RunStore.create(run_dir).start()
        devices = [f"pi-{i:02d}" for i in range(args.devices)]
        for i, device in enumerate(devices):
            store.add_device(device, "ssh", f"10.0.0.{i + 1}", ["pi4"], {"type": "um25c"})
            store.set_device_status(device, "running")
        store.add_jobs(
            [
                PlannedJob(f"job-{d}", i, "train", "lowmem", "mlp", "digits", 100, 9, None, 0,
                           0, (), {})
                for i, d in enumerate(devices)
            ]
        )  # fmt: skip
        store.flush()
        server = start_dashboard(run_dir, port=0)
        stop = threading.Event()
        counts: dict[str, int] = {}

        def device_thread(name: str) -> None:
            counts[name] = feed(store, name, args.rate_hz, stop)

        threads = [threading.Thread(target=device_thread, args=(d,)) for d in devices]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server.url)
            page.wait_for_function("window.dashboard.summaries > 0")
            for thread in threads:
                thread.start()
            time.sleep(args.warmup_s)
            page.evaluate("window.dashboard.latencies = []")
            t_measure = time.time()
            time.sleep(args.seconds)
            stop.set()
            for thread in threads:
                thread.join()
            time.sleep(2.0)  # let the last samples reach the page
            latencies = page.evaluate("window.dashboard.latencies")
            drawn = page.evaluate("window.dashboard.drawnSamples")
            browser.close()
        server.stop()
        store.flush()
        stored = store.query("SELECT COUNT(*) AS n FROM power_samples WHERE t_host_s >= ?",
                             (t_measure,))[0]["n"]  # fmt: skip
        total = store.query("SELECT COUNT(*) AS n FROM power_samples")[0]["n"]
        store.close()

    latencies.sort()
    n = len(latencies)
    if n == 0:
        print("no sample was drawn", file=sys.stderr)
        return 1
    median = statistics.median(latencies)
    quantile = lambda q: latencies[min(n - 1, int(q * n))]  # noqa: E731
    print(
        f"{args.devices} devices x {args.rate_hz:g} samples/s for {args.seconds:g} s "
        f"({args.devices * args.rate_hz:g} samples/s into the store)"
    )
    print(f"samples stored while measured: {stored}; stamped as drawn: {n}")
    print(f"samples drawn on the page at the end: {drawn} of {total} stored")
    print(
        f"store -> drawn latency: median {median * 1000:.0f} ms, p90 {quantile(0.9) * 1000:.0f} "
        f"ms, p99 {quantile(0.99) * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms, "
        f"min {latencies[0] * 1000:.0f} ms"
    )
    ok = median < TARGET_MEDIAN_S and drawn == total
    print(f"median under {TARGET_MEDIAN_S:g} s and every stored sample drawn: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
