"""The stack's Prefect objects: the process work pool, the retraining deployment and the
automation that marks a run Crashed when its worker dies.

The deployment (`esmm-retrain/<schedule.deployment>`, entrypoint
`flows/retrain.py:retrain`) is registered from the git repository: each run clones the
committed code into the worker's scratch folder, points DVC at the shared remote and
fetches the data version that `data.dvc` names (`esmm data pull`), then runs the flow
there. Its cron schedule comes from params.yaml (`schedule.*`), and its concurrency limit
of 1 makes a second run wait for the first, so two runs never race on the registry.

All calls go to the server named by PREFECT_API_URL / PREFECT_API_AUTH_STRING.
"""

from __future__ import annotations

import shlex
from datetime import timedelta
from pathlib import Path

from tasks.config import ScheduleConfig

ENTRYPOINT = "flows/retrain.py:retrain"
ZOMBIE_AUTOMATION = "esmm: crash runs whose heartbeats stop"
ZOMBIE_AFTER_SECONDS = 75  # runs beat every 30 s (services.worker)


def source_url(source: str) -> str:
    """A local repository path as a `file://` URL (git URLs pass unchanged)."""
    path = Path(source)
    return path.resolve().as_uri() if path.is_dir() else source


def pull_steps(source: str, dvc_remote: str, params_path: str) -> list[dict]:
    """Clone the repository, make the shared DVC remote its default, fetch the data."""
    script = [f"esmm data pull --params {shlex.quote(params_path)}"]
    if dvc_remote:
        remote = f"dvc remote add --local --force --default shared {shlex.quote(dvc_remote)}"
        script.insert(0, remote)
    return [
        {"prefect.deployments.steps.git_clone": {"id": "clone", "repository": source_url(source)}},
        {
            "prefect.deployments.steps.run_shell_script": {
                "directory": "{{ clone.directory }}",
                "script": "\n".join(script),
                "stream_output": True,
            }
        },
    ]


def ensure_work_pool(name: str) -> None:
    """Create the process work pool `name` if it does not exist."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(
                WorkPoolCreate(name=name, type="process", base_job_template=template)
            )
        except ObjectAlreadyExists:
            pass


def ensure_zombie_automation() -> None:
    """Mark a flow run Crashed when its heartbeats stop before it ends (its worker died)."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        Automation.read(name=ZOMBIE_AUTOMATION)
        return
    except ValueError:
        pass  # not there yet
    ends = ("Completed", "Failed", "Cancelled", "Crashed")
    Automation(
        name=ZOMBIE_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in ends)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=ZOMBIE_AFTER_SECONDS),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message="no heartbeat: its worker or machine stopped during the run",
            )
        ],
    ).create()


def register_deployment(
    cfg: ScheduleConfig, pool: str, source: str, dvc_remote: str, params_path: str = "params.yaml"
) -> str:
    """Create or update the cron-scheduled retraining deployment on `pool`; returns its
    full name (`esmm-retrain/nightly`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule

    from flows.retrain import retrain  # loads TensorFlow: only where a deployment is made

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(retrain.name)
        client.create_deployment(
            flow_id=flow_id,
            name=cfg.deployment,
            work_pool_name=pool,
            entrypoint=ENTRYPOINT,
            pull_steps=pull_steps(source, dvc_remote, params_path),
            parameters={"params_path": params_path},
            parameter_openapi_schema=retrain.parameters.model_dump_for_openapi(),
            schedules=[
                DeploymentScheduleCreate(
                    schedule=CronSchedule(cron=cfg.cron, timezone=cfg.timezone), active=True
                )
            ],
            concurrency_limit=1,  # one retraining at a time: a second run waits
            description="ESMM retraining: ingest, validate, train, evaluate, gate, register",
            tags=["esmm", "retraining"],
        )
    return f"{retrain.name}/{cfg.deployment}"
