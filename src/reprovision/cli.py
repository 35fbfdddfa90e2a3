"""`reprovision` command line: the tools around the DVC pipeline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .layout import STUDY


def _server(args: argparse.Namespace) -> int:
    from . import server
    from .track import project_root, server_uri

    if args.action == "start":
        print(server.start(port=args.port))
    elif args.action == "stop":
        print("stopped" if server.stop() else "not running")
    else:
        uri = server_uri(project_root())
        print(uri or "not running")
        return 0 if uri else 1
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from .reproduce import ReproduceError, reproduce

    try:
        return reproduce(args.run_id, args.dry_run)
    except ReproduceError as err:
        print(f"reprovision reproduce: {err}", file=sys.stderr)
        return 2


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _fractions(text: str) -> list[float]:
    try:
        return [float(item) for item in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers in (0, 1], e.g. 0.1,0.25,0.5,1.0") from None


def _study(args: argparse.Namespace) -> int:
    from . import study

    try:
        if args.queue_data_size or args.queue_ssl_size:
            study.queue_data_size(args.fractions, args.set, dry_run=args.dry_run, ssl=args.queue_ssl_size)
        elif args.ssl_size:
            table = study.collect_probe_runs(_csv(args.exp_names), args.since)
            print(f"study: {study.write_ssl_size_study(table, Path(args.out), record=args.record)}")
        else:
            print(f"study: {study.run_study(Path(args.out), args.name, _csv(args.x), _csv(args.exp_names), args.since)}")
    except study.StudyError as err:
        print(f"reprovision study: {err}", file=sys.stderr)
        return 2
    return 0


def _tune(args: argparse.Namespace) -> int:
    from . import tune

    try:
        tune.tune(args.model, args.trials, args.epochs, args.set, args.timeout, args.name, args.seed)
    except tune.TuneError as err:
        print(f"reprovision tune: {err}", file=sys.stderr)
        return 2
    return 0


def _promote(args: argparse.Namespace) -> int:
    from . import registry, track

    champion = registry.read_champion(track.project_root())
    if champion is None or not champion.version:
        print("reprovision promote: no registered ViT and CNN here: run the pipeline first (`dvc repro`)", file=sys.stderr)
        return 2
    registry.promote(champion)
    print(f"champion: {champion.sentence()}\n{champion.uri}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reprovision", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    srv = sub.add_parser("mlflow-server", help="start/stop the local MLflow server used for parallel experiments")
    srv.add_argument("action", choices=["start", "stop", "status"])
    srv.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    srv.set_defaults(func=_server)

    rep = sub.add_parser("reproduce", help="train a recorded MLflow run again from its commit and params (in a temp clone) and compare")
    rep.add_argument("run_id")
    rep.add_argument("--dry-run", action="store_true", help="print what would be replayed only")
    rep.set_defaults(func=_reproduce)

    std = sub.add_parser("study", help="tabulate and plot the classifier runs of a study (reads MLflow)",
                         description="Examples: reprovision study --since 2025-06-01T14:30 | "
                         "reprovision study --exp-names 'tune-vit-*' | reprovision study --queue-data-size --dry-run")
    std.add_argument("--name", default="study", help="title of the report")
    std.add_argument("--out", default=str(STUDY), help="folder for study.md, study.csv and the plots")
    std.add_argument("--x", default="lr,weight_decay,train_fraction", help="run params to plot accuracy against, comma-separated")
    std.add_argument("--exp-names", default="", help="only these DVC experiments, comma-separated; shell patterns allowed ('tune-vit-*')")
    std.add_argument("--since", help="only runs started at or after this ISO time (2025-06-01T14:30) or this MLflow run id's start")
    std.add_argument("--queue-data-size", action="store_true", help="instead: queue the data-size study (R4) with `dvc exp run --queue`")
    std.add_argument("--queue-ssl-size", action="store_true", help="instead: queue the pre-training-set-size study (R4's SSL: ssl.train_fraction)")
    std.add_argument("--ssl-size", action="store_true", help="instead: linear-probe accuracy vs pre-training images, from the linear-probe runs")
    std.add_argument("--record", action="store_true", help="with --ssl-size: also write benchmarks/ssl_size_study.json, which the report shows")
    std.add_argument("--fractions", type=_fractions, default="0.1,0.25,0.5,1.0", help="fractions for --queue-data-size / --queue-ssl-size")
    std.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every queued experiment (repeatable)")
    std.add_argument("--dry-run", action="store_true", help="with --queue-*-size: print the commands, queue nothing")
    std.set_defaults(func=_study)

    tun = sub.add_parser("tune", help="Optuna search of lr, weight decay, label smoothing; one DVC experiment per trial")
    tun.add_argument("--model", required=True, choices=["vit", "cnn"])
    tun.add_argument("--trials", type=int, required=True, help="number of trials (each a `dvc exp run`)")
    tun.add_argument("--epochs", type=int, help="epochs per trial (default: params.yaml)")
    tun.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra `-S` override for every trial (repeatable)")
    tun.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    tun.add_argument("--name", help="study name; trials are DVC experiments tune-<name>-<k> (default: <model>-<MMDD-HHMM>)")
    tun.add_argument("--seed", type=int, default=0, help="seed of Optuna's TPE sampler")
    tun.set_defaults(func=_tune)

    pro = sub.add_parser("promote", help="set the registry alias `champion` on the better classifier of this checkout (by val_acc)")
    pro.set_defaults(func=_promote)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
