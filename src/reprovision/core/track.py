"""MLflow tracking under one name, for code that uses several of its parts (`track.stage_run`,
`track.log_metrics`, `track.TrackingError`, ...). The parts, each importable alone:

- track_store.py: where runs go (URI, experiment, the team server's login), failing fast when they
  can't be recorded, and a store that stops answering mid-run;
- track_run.py: one run per executed stage, its tags, its parent run and how it ends;
- track_log.py: what a run records (metrics, artifacts, datasets, the model) and models/<name>/run.json.

Importing this module imports all three; a stage that needs fewer imports those alone, so that
editing one part re-runs only the stages that use it.
"""

from reprovision.core.stage import resume_hint
from reprovision.core.track_log import (
    DATASET_CONTEXTS,
    DATASET_INSERT_CLASHES,
    MODEL_TAGS,
    log_artifacts,
    log_datasets,
    log_epoch,
    log_metrics,
    log_model,
    write_run_ref,
)
from reprovision.core.track_run import (
    EXP_PARENT,
    EXPERIMENT_KIND,
    LIBRARIES,
    PARENT_RUN_ENV,
    RESOLVED_PARAMS,
    git_state,
    library_versions,
    stage_run,
)
from reprovision.core.track_store import (
    DATABASE_SERVERS,
    DEFAULT_EXPERIMENT,
    HTTP_DEFAULTS,
    LOCAL_UI,
    SERVER_STATE,
    artifact_location,
    check_store,
    database_problem,
    experiment_name,
    project_root,
    server_uri,
    shown_url,
    tracking_uri,
    training_runs_url,
)
from reprovision.errors import Terminated, TrackingError

__all__ = [
    "DATASET_CONTEXTS",
    "DATASET_INSERT_CLASHES",
    "DATABASE_SERVERS",
    "DEFAULT_EXPERIMENT",
    "EXPERIMENT_KIND",
    "EXP_PARENT",
    "HTTP_DEFAULTS",
    "LIBRARIES",
    "LOCAL_UI",
    "MODEL_TAGS",
    "PARENT_RUN_ENV",
    "RESOLVED_PARAMS",
    "SERVER_STATE",
    "Terminated",
    "TrackingError",
    "artifact_location",
    "check_store",
    "database_problem",
    "experiment_name",
    "git_state",
    "library_versions",
    "log_artifacts",
    "log_datasets",
    "log_epoch",
    "log_metrics",
    "log_model",
    "project_root",
    "resume_hint",
    "server_uri",
    "shown_url",
    "stage_run",
    "tracking_uri",
    "training_runs_url",
    "write_run_ref",
]
