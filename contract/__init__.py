"""The contract between the host and the devices, importable on both sides without torch.

Modules (standard library only):

- `vocabulary`: the engine's names a job may use: models, methods, optimizers, data sets,
  lowmem switches, and the momentum-format syntax (`parse_momentum_format`).
- `jobspec`: the job spec (`JobSpec` and its parts): what the host sends a device.
- `events`: the event envelope and one frozen dataclass per event kind (`Step`,
  `EpochEnd`, `Memory`, ...): what a device streams back; the agent's exit codes.
- `fields`: `SpecError` and the field checks the records above share.
- `layout`: a device's work directory (`code/`, `data/`, `jobs/<job id>/`).
- `checksum`: the one sha256-of-a-file helper.
- `errors`: `UsageError`, bad input from the user (one line naming the value and choices).

Nothing here imports `trainers`, `device_agent`, `harness` or `analysis`: every other
package imports this one (see docs/DEVELOPMENT.md for the arrows).
"""
