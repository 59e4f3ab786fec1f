"""The team deployment on one machine: `esmm stack up | status | down`.

PostgreSQL, an MLflow tracking server and a Prefect server on it, a process work pool with
its workers, a shared DVC remote, and the settings file that points `esmm` at all of it.
`settings` is imported at every CLI start and stays free of heavy imports; `postgres`,
`processes`, `services` and `deploy` start, check and stop the parts.
"""
