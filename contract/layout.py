"""A device's work directory: the same layout on every device, local or over SSH.

::

    code/contract/ code/datafiles/ code/device_agent/ code/trainers/   the agent's code
    data/<file name>                                   prepared data sets, user scripts
    jobs/<job id>/job.json                             the job's spec, as the agent reads it
    jobs/<job id>/events.jsonl, result.json, ...       what the agent writes (its --out)

The agent runs with the work directory as its current directory, so a job spec
names its files by these relative paths (`JobSpec.on_device`). Deployment copies
files here only when their checksum differs (`harness.fleet.deploy`,
`harness.local`).
"""

from __future__ import annotations

from pathlib import PurePath

CODE_DIR = "code"
DATA_DIR = "data"
JOBS_DIR = "jobs"
# The packages a device runs (copied under code/): the contract, the agent and the engine.
DEVICE_PACKAGES = ("contract", "datafiles", "device_agent", "trainers")


def device_data_path(file_name: str | PurePath) -> str:
    """Where a prepared data set (or script) file lives on every device: data/<its name>."""
    return f"{DATA_DIR}/{PurePath(file_name).name}"


def device_job_dir(job_id: str) -> str:
    """The job's directory on the device (the agent's --out)."""
    return f"{JOBS_DIR}/{job_id}"


def device_spec_path(job_id: str) -> str:
    """The job spec's file on the device."""
    return f"{device_job_dir(job_id)}/job.json"
