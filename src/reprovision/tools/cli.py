"""`reprovision` command line: the tools around the DVC pipeline."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from reprovision.layout import CLASSIFIERS, STUDY
from reprovision.tools.recipes import RECIPES


def _server(args: argparse.Namespace) -> int:
    from reprovision.core.track import project_root, server_uri
    from reprovision.tools import server

    if args.action == "start":
        print(
            server.start(
                port=args.port,
                host=args.host,
                backend_store_uri=args.backend_store_uri,
                artifacts_destination=args.artifacts_destination,
                auth=args.auth,
                auth_database_uri=args.auth_database_uri,
            )
        )
    elif args.action == "stop":
        print("stopped" if server.stop() else "not running")
    else:
        uri = server_uri(project_root())
        print(uri or "not running")
        return 0 if uri else 1
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from reprovision.tools.reproduce import reproduce

    return reproduce(args.run_id, args.dry_run)


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _fractions(text: str) -> list[float]:
    try:
        return [float(item) for item in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated numbers in (0, 1], e.g. 0.1,0.25,0.5,1.0"
        ) from None


def _study(args: argparse.Namespace) -> int:
    from reprovision.tools import study

    if args.queue_data_size or args.queue_ssl_size:
        study.queue_data_size(args.fractions, args.set, dry_run=args.dry_run, ssl=args.queue_ssl_size, seeds=args.seeds)
    elif args.ssl_size:
        table = study.collect_probe_runs(_csv(args.exp_names), args.since)
        print(f"study: {study.write_ssl_size_study(table, Path(args.out), record=args.record)}")
    else:
        print(f"study: {study.run_study(Path(args.out), args.name, _csv(args.x), _csv(args.exp_names), args.since)}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from reprovision.tools import tune

    tune.tune(args.model, args.trials, args.epochs, args.set, args.timeout, args.name, args.seed, storage=args.storage)
    return 0


def _exp_worker(args: argparse.Namespace) -> int:
    from reprovision.tools import worker

    worker.run(args.origin, args.name, args.set, args.targets, rev=args.rev, workdir=args.workdir)
    return 0


def _recipe(args: argparse.Namespace) -> int:
    """`dvc exp run` with the recipe's `-S` overrides and its name, then the user's arguments (a later `-S` of
    the same key wins); the line is printed first, every value on it."""
    import shlex
    import shutil
    import subprocess

    from reprovision.tools.recipes import recipe_set_args

    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"  # this environment's first
    command = [dvc, "exp", "run", *recipe_set_args(RECIPES[args.name]), *args.dvc_args]
    print(shlex.join(["dvc", *command[1:]]), flush=True)
    return 0 if args.print else subprocess.run(command).returncode


def _add_recipe(sub: argparse._SubParsersAction) -> None:
    rec = sub.add_parser(
        "recipe",
        help="run a training recipe (reprovision/tools/recipes.py) through the pipeline: dvc exp run -S ...",
        description="Examples: reprovision recipe airbench94 | reprovision recipe airbench94 -n ab-s1 -S seed=1 "
        "train-cnn | reprovision recipe vit-hybrid --queue | reprovision recipe --print improved. Everything after "
        "the name goes to `dvc exp run`, after the recipe's overrides: a -S there overrides the recipe's value. "
        "Every value lands in params.yaml (and `dvc exp show`, MLflow), and its name in params.yaml's `recipe`.",
    )
    rec.add_argument("--print", action="store_true", help="print the `dvc exp run` line only")
    rec.add_argument("name", choices=list(RECIPES), help=f"one of {', '.join(RECIPES)}")
    rec.add_argument("dvc_args", nargs=argparse.REMAINDER, metavar="...", help="more `dvc exp run` arguments")
    rec.set_defaults(func=_recipe, store=False)  # its stages check the store themselves


def _promote(args: argparse.Namespace) -> int:
    from reprovision.core import track
    from reprovision.publish import registry

    root = track.project_root()
    champion = registry.read_champion(root)
    if champion is None or not champion.version:
        reason = registry.why_no_champion(registry.read_records(root)[0])
        print(
            f"reprovision promote: {reason or 'no registered ViT and CNN here: run the pipeline first (`dvc repro`)'}",
            file=sys.stderr,
        )
        return 2
    from reprovision.config import PARAMS_FILE, load_params

    val_split = registry.read_records(root)[0][champion.model].get("val_split", "unrecorded")
    margin = load_params(root / PARAMS_FILE).registry.promote_margin
    promotion = registry.promote(champion, val_split, margin=margin, force=args.force)
    print(f"this checkout's champion: {champion.sentence()}\n{promotion.why}")
    return (
        0 if promotion.moved or promotion.incumbent == f"{champion.registered_model} version {champion.version}" else 1
    )


# The errors a user can fix, each raised with one message naming the problem and the fix: (module, class).
# Looked up in sys.modules, so that naming them imports nothing (a module never imported raised none of them).
USER_ERRORS = (
    ("reprovision.config", "ConfigError"),
    ("reprovision.data.datasets", "DataError"),
    ("reprovision.core.track", "TrackingError"),
    ("reprovision.tools.reproduce", "ReproduceError"),
    ("reprovision.tools.server", "ServerError"),
    ("reprovision.tools.study", "StudyError"),
    ("reprovision.tools.tune", "TuneError"),
    ("reprovision.tools.tune", "TrialFailed"),
    ("reprovision.tools.worker", "WorkerError"),
)


# A command's `store` default: True, False, or this variable's name (checked when the variable names a store).
TRACKING_ENV = "MLFLOW_TRACKING_URI"


def one_line(text: str) -> str:
    """A message on one line: a ConfigError's list of mistakes or a library's multi-line text, joined with '; '."""
    lines = [line.strip().removeprefix("- ") for line in str(text).splitlines() if line.strip()]
    if len(lines) < 2:
        return "".join(lines)
    head = lines[0] if lines[0].endswith(":") else lines[0] + ";"
    return f"{head} {'; '.join(lines[1:])}"


def _explain(err: Exception) -> str | None:
    """What to print for an error a user can fix (None: a bug, left to its traceback). Library errors come from
    what the user gave (a database URL, a tracking URI), so they are named with where to fix them."""
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(err, cls):
            return str(err)
    sqlalchemy_exc = sys.modules.get("sqlalchemy.exc")
    if sqlalchemy_exc is not None and isinstance(err, sqlalchemy_exc.SQLAlchemyError):
        why = (str(getattr(err, "orig", None) or err).strip().splitlines() or [type(err).__name__])[0]
        return (
            f"database error ({why}): check the database URL (--storage, --backend-store-uri, MLFLOW_TRACKING_URI) "
            "and that its server is running"
        )
    store = sys.modules.get("reprovision.core.track_store")
    cause = store.outage_cause(err) if store is not None and "requests" in sys.modules else None
    if cause is not None:
        return (
            f"the MLflow tracking store {store.tracking_uri()} does not answer ({type(cause).__name__}): start it "
            "(`reprovision mlflow-server start`), or point MLFLOW_TRACKING_URI at one that runs"
        )
    return None


def _preflight(args: argparse.Namespace) -> None:
    """What main checks before a command starts anything, each mistake a one-line error: the project's
    params.yaml (when the folder has one), for every command but `mlflow-server stop|status`, which must work
    whatever the file holds; then, for the commands that read or log runs, the MLflow tracking store."""
    from reprovision.config import PARAMS_FILE, load_params
    from reprovision.core import track

    if args.command == "mlflow-server" and args.action != "start":
        return
    if PARAMS_FILE.exists():
        load_params(PARAMS_FILE)
    if args.store is True or (args.store == TRACKING_ENV and os.environ.get(TRACKING_ENV)):
        track.check_store(track.tracking_uri())


def main(argv: list[str] | None = None) -> int:
    """Every command's errors that a user can fix end here: one line on stderr, exit status 2, no traceback
    (Ctrl-C or SIGTERM: 130); a command adds no handling of its own."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _preflight(args)
        return args.func(args)
    except KeyboardInterrupt as err:  # tune's trial is stopped on the way out (tune.run_trial)
        how = "SIGTERM" if type(err).__name__ == "Terminated" else "Ctrl-C (SIGINT)"
        print(f"reprovision {args.command}: interrupted by {how}", file=sys.stderr)
        return 130
    except Exception as err:
        explained = _explain(err)
        if explained is None:
            raise
        print(f"reprovision {args.command}: {one_line(explained)}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The command line; each subcommand's defaults name its function (`func`) and whether it reads or logs
    MLflow runs (`store`, see TRACKING_ENV: main checks the tracking store first)."""
    parser = argparse.ArgumentParser(prog="reprovision", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    _add_mlflow_server(sub)
    _add_reproduce(sub)
    _add_study(sub)
    _add_tune(sub)
    _add_exp_worker(sub)
    _add_recipe(sub)
    _add_promote(sub)
    return parser


def _add_mlflow_server(sub: argparse._SubParsersAction) -> None:
    """`reprovision mlflow-server start|stop|status`."""
    srv = sub.add_parser(
        "mlflow-server",
        help="start/stop the MLflow server used for parallel experiments or by a team",
        description="Default: the repository's mlflow.db and mlartifacts/ on 127.0.0.1, no login. "
        "A team server: --host <LAN address> --port 5000 --auth --backend-store-uri postgresql+psycopg://... "
        "--artifacts-destination s3://... (see src/reprovision/tools/server.py and README 'Team setup').",
    )
    srv.add_argument("action", choices=["start", "stop", "status"])
    srv.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    srv.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1, this machine only); a team server binds its LAN address",
    )
    srv.add_argument(
        "--backend-store-uri",
        metavar="URI",
        help="runs, params, metrics: e.g. postgresql+psycopg://mlflow@db.lan:5432/mlflow "
        "(default: the repo's sqlite mlflow.db)",
    )
    srv.add_argument(
        "--artifacts-destination",
        metavar="URI",
        help="where the server puts artifacts, e.g. s3://bucket/mlartifacts with the server's own "
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and MLFLOW_S3_ENDPOINT_URL for S3-compatible storage); "
        "clients need no storage credentials (default: the repo's mlartifacts/)",
    )
    srv.add_argument(
        "--auth",
        action="store_true",
        help="require a login (MLflow's basic-auth app); the admin account comes from "
        "MLFLOW_AUTH_ADMIN_USERNAME and MLFLOW_AUTH_ADMIN_PASSWORD in the environment",
    )
    srv.add_argument(
        "--auth-database-uri",
        metavar="URI",
        help="with --auth: MLflow's user and permission database (default: sqlite .mlflow-server/basic_auth.db)",
    )
    srv.set_defaults(func=_server, store=False)  # it is the store


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    """`reprovision reproduce RUN_ID`."""
    rep = sub.add_parser(
        "reproduce", help="train a recorded MLflow run again from its commit and params (in a temp clone) and compare"
    )
    rep.add_argument("run_id")
    rep.add_argument("--dry-run", action="store_true", help="print what would be replayed only")
    rep.set_defaults(func=_reproduce, store=True)


def _add_study(sub: argparse._SubParsersAction) -> None:
    """`reprovision study`: the study report, or queueing a data-size study."""
    std = sub.add_parser(
        "study",
        help="tabulate and plot the classifier runs of a study (reads MLflow)",
        description="Examples: reprovision study --since 2025-06-01T14:30 | "
        "reprovision study --exp-names 'tune-vit-*' | reprovision study --queue-data-size --dry-run",
    )
    std.add_argument("--name", default="study", help="title of the report")
    std.add_argument("--out", default=str(STUDY), help="folder for study.md, study.csv and the plots")
    std.add_argument(
        "--x", default="lr,weight_decay,train_fraction", help="run params to plot accuracy against, comma-separated"
    )
    std.add_argument(
        "--exp-names",
        default="",
        help="only these DVC experiments, comma-separated; shell patterns allowed ('tune-vit-*')",
    )
    std.add_argument(
        "--since", help="only runs started at or after this ISO time (2025-06-01T14:30) or this MLflow run id's start"
    )
    std.add_argument(
        "--queue-data-size",
        action="store_true",
        help="instead: queue the data-size study (R4) with `dvc exp run --queue`",
    )
    std.add_argument(
        "--queue-ssl-size",
        action="store_true",
        help="instead: queue the pre-training-set-size study (R4's SSL: ssl.train_fraction)",
    )
    std.add_argument(
        "--ssl-size",
        action="store_true",
        help="instead: linear-probe accuracy vs pre-training images, from the linear-probe runs",
    )
    std.add_argument(
        "--record",
        action="store_true",
        help="with --ssl-size: also write benchmarks/ssl_size_study.json, which the report shows",
    )
    std.add_argument(
        "--fractions",
        type=_fractions,
        default="0.1,0.25,0.5,1.0",
        help="fractions for --queue-data-size / --queue-ssl-size",
    )
    std.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra override for every queued experiment (repeatable)",
    )
    std.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="with --queue-*-size: run each setting with seeds 0..N-1, so that study.md gives 95 %% intervals",
    )
    std.add_argument("--dry-run", action="store_true", help="with --queue-*-size: print the commands, queue nothing")
    std.set_defaults(func=_study, store=True)


def _add_tune(sub: argparse._SubParsersAction) -> None:
    """`reprovision tune`: an Optuna search, one DVC experiment per trial."""
    tun = sub.add_parser(
        "tune", help="Optuna search of lr, weight decay, label smoothing; one DVC experiment per trial"
    )
    tun.add_argument("--model", required=True, choices=CLASSIFIERS)
    tun.add_argument("--trials", type=int, required=True, help="number of trials (each a `dvc exp run`)")
    tun.add_argument("--epochs", type=int, help="epochs per trial (default: params.yaml)")
    tun.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra `-S` override for every trial (repeatable)",
    )
    tun.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    tun.add_argument(
        "--name", help="study name; trials are DVC experiments tune-<name>-<k> (default: <model>-<MMDD-HHMM>)"
    )
    tun.add_argument("--seed", type=int, default=0, help="seed of Optuna's TPE sampler")
    tun.add_argument(
        "--storage", help="the study's database URL (default: sqlite:///optuna.db here); the same --name resumes it"
    )
    tun.set_defaults(func=_tune, store=True)


def _add_exp_worker(sub: argparse._SubParsersAction) -> None:
    """`reprovision exp-worker`: one DVC experiment on any machine."""
    wrk = sub.add_parser(
        "exp-worker",
        help="on any machine: clone the origin, run one DVC experiment, push it and its run-cache back",
        description="Example: reprovision exp-worker --origin git@git.lan:team/reprovision.git -n lr-4e-4 -S lr=4e-4. "
        "Stages a teammate already ran come from the DVC remote's run-cache; get the result anywhere with "
        "`dvc exp pull origin <name>`. deploy/ has a SLURM array and a Kubernetes Job running it.",
    )
    wrk.add_argument(
        "--origin", required=True, help="the team's git repository (URL or path), with a DVC remote configured"
    )
    wrk.add_argument("-n", "--name", required=True, help="the experiment's name (as `dvc exp run -n`)")
    wrk.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="param override (repeatable, as `dvc exp run -S`)",
    )
    wrk.add_argument("--rev", default="main", help="branch or tag of the origin to start from (default: main)")
    wrk.add_argument(
        "--workdir", type=Path, help="an empty or new folder for the clone (default: a new temporary folder)"
    )
    wrk.add_argument("targets", nargs="*", help="stages to run (default: the whole pipeline)")
    # Its stages log where MLFLOW_TRACKING_URI points (the team's server); unset, to the clone's own mlflow.db.
    wrk.set_defaults(func=_exp_worker, store=TRACKING_ENV)


def _add_promote(sub: argparse._SubParsersAction) -> None:
    """`reprovision promote`: move the registry alias `champion`."""
    pro = sub.add_parser(
        "promote", help="move the registry alias `champion` to this checkout's better classifier through the gate"
    )
    pro.add_argument(
        "--force", action="store_true", help="move the alias even if the holder scores as well or on another split"
    )
    pro.set_defaults(func=_promote, store=True)


if __name__ == "__main__":
    sys.exit(main())
