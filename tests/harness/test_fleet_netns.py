"""Devices in network namespaces: netem delay/loss, and a link cut while a job runs."""

from __future__ import annotations

import json
import time

import pytest
from fleet import idle_spec, lab_factory, processes_under, requires_sshd, wait_until  # noqa: F401

from harness.clock import estimate_offset
from harness.errors import DeviceLost
from harness.fleet.transport import SshTransport
from harness.inventory import load_inventory
from harness.lab import netem_available, netns_available

pytestmark = [
    requires_sshd,
    pytest.mark.skipif(not netns_available(), reason="network namespaces need root + iproute2"),
]


@pytest.mark.skipif(not netem_available(), reason="this kernel has no sch_netem (tc netem)")
def test_delay_and_loss_still_complete(lab_factory):  # noqa: F811
    lab = lab_factory(1, netns=True)
    lab.netem("dev1", ["delay", "40ms", "loss", "2%"])
    device = load_inventory(lab.inventory_path).device("dev1")
    with SshTransport(device) as transport:
        transport.ensure_deployed([])
        estimate = estimate_offset(transport, 6)
        assert estimate.rtt_s >= 0.04  # the delay is on the wire
        job = transport.start_job(idle_spec("under-netem", 1.0))
        kinds = [json.loads(line)["kind"] for line in job.lines()]
        assert job.wait(30) == 0 and kinds[-1] == "job_end"


@pytest.mark.slow
def test_cut_link_is_noticed_and_the_job_stopped(lab_factory):  # noqa: F811
    lab = lab_factory(1, netns=True)
    device = load_inventory(lab.inventory_path).device("dev1")
    with SshTransport(device) as transport:
        transport.ensure_deployed([])
        job = transport.start_job(idle_spec("cut", 300))
        lines = job.lines()
        assert "job_start" in (json.loads(line)["kind"] for line in lines)
        lab.set_link("dev1", up=False)  # no FIN, no RST: only keepalives can tell
        started = time.monotonic()
        with pytest.raises(DeviceLost):
            list(lines)
        noticed_s = time.monotonic() - started
    # keepalive_s is 2 in the lab inventory: TCP_USER_TIMEOUT (4 periods) ends it.
    assert noticed_s < 20, noticed_s
    # sshd's ClientAlive ends the session; the launcher then stops the agent.
    assert wait_until(lambda: not processes_under(device.workdir), 20)
    lab.set_link("dev1", up=True)
