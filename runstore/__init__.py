"""The run store's format and its one reader, for every package that reads a run.

- `runstore.schema`: table definitions, the schema version and its migrations.
- `runstore.reader`: `StoreReader`, the read-only view every reader uses (the analysis,
  the dashboard, `harness export`/`report`, the end-of-run table): it checks the schema
  version and owns the queries.

The writer is the host's (`harness.store.RunStore`); it applies `runstore.schema`.
Standard library only (numpy and the ADBC driver for `StoreReader.power_traces`).
"""
