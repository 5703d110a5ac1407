"""`/metrics` scraped over HTTP from the dashboard server and read with Prometheus's own
text-format parser: power, energy, memory and job state per device, growing as the store
grows, behind the same token rule as every other route."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from test_dashboard import Sample, get, write_run

from analysis.run_energy import PhaseWindow, figure_for, unknown_meter
from harness.dashboard import start_dashboard
from harness.store import MemorySample


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[str, list]:
    status, body, response_headers = get(url, headers)
    assert status == 200, body
    assert response_headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {}
    for family in text_string_to_metric_families(body):
        families[family.name] = family.samples
    return families


def value(samples: list, **labels: str) -> float:
    (match,) = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    return match


def test_metrics_scraped_over_http(tmp_path: Path):
    t0 = time.time() - 30
    run_dir = tmp_path / "runs" / "r1"
    store = write_run(run_dir, t0, n=50)
    store.add_memory_samples([MemorySample("pi-1", "job-a", 1, 1, t0 + 1.0, t0 + 1.0, 1,
                                           50_000_000, 60_000_000, 70_000_000, 4_000_000, 3)])
    store.flush()
    with start_dashboard(tmp_path / "runs") as server:
        metrics = scrape(f"{server.base_url}/metrics")
        labels = {"run": "r1", "device": "pi-1", "meter": "um25c"}
        assert value(metrics["bnn_device_power_watts"], **labels) == 3.0 + 49 % 5
        assert math.isclose(value(metrics["bnn_device_power_sample_time_seconds"], **labels),
                            t0 + 4.9)
        # The running job's energy so far: the analysis function over [setup end, last sample].
        t = np.array([t0 + i * 0.1 for i in range(50)])
        w = np.array([3.0 + i % 5 for i in range(50)])
        so_far = PhaseWindow("pi-1", "job-a", 1, "job", 0, t0 + 0.5, t0 + 4.9)
        expected = figure_for(t, w, so_far, idle=None, gaps=[], clock=None,
                              accuracy=unknown_meter("um25c").accuracy).energy_j
        job = value(metrics["bnn_job_energy_joules"], job="job-a", method="standard", **labels)
        assert math.isclose(job, expected, rel_tol=1e-9)
        assert value(metrics["bnn_device_energy_joules"], **labels) == job  # _total counter
        assert value(metrics["bnn_device_memory_rss_bytes"], run="r1", device="pi-1") == 5e7
        assert value(metrics["bnn_device_memory_peak_tensor_bytes"], device="pi-1") == 4e6
        assert value(metrics["bnn_device_state"], device="pi-1", bnn_device_state="running") == 1
        assert value(metrics["bnn_device_state"], device="pi-1", bnn_device_state="done") == 0
        assert value(metrics["bnn_jobs"], run="r1", status="running") == 1

        # More samples and the job's end: the next scrape reads only what is new.
        store.add_power_samples("pi-1", "um25c", [Sample(t0 + 5 + i * 0.1, 8.0) for i in range(20)])
        store.add_phase("pi-1", "job-a", 1, "job", 0, t0 + 0.5, t0 + 6.9)
        store.finish_job("job-a", "completed", 0, "ok", t0 + 6.9)
        store.set_device_status("pi-1", "done")
        store.flush()
        later = scrape(f"{server.base_url}/metrics?run=r1")
        assert value(later["bnn_device_power_watts"], **labels) == 8.0
        assert value(later["bnn_device_energy_joules"], **labels) > job
        assert value(later["bnn_jobs"], run="r1", status="completed") == 1
        assert value(later["bnn_device_state"], device="pi-1", bnn_device_state="done") == 1
    store.close()


def test_metrics_need_the_token_like_every_route(tmp_path: Path):
    store = write_run(tmp_path / "r2", time.time())
    store.close()
    with start_dashboard(tmp_path / "r2", host="127.0.0.1", token="s3cret") as server:
        assert get(f"{server.base_url}/metrics")[0] == 401
        metrics = scrape(f"{server.base_url}/metrics",
                         {"Authorization": "Bearer s3cret"})  # Prometheus' bearer_token
        assert "bnn_device_power_watts" in metrics
