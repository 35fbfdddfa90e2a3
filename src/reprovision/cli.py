"""`reprovision` command line: the tools around the DVC pipeline."""

from __future__ import annotations

import argparse
import sys


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reprovision", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    srv = sub.add_parser("mlflow-server", help="start/stop the local MLflow server used for parallel experiments")
    srv.add_argument("action", choices=["start", "stop", "status"])
    srv.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    srv.set_defaults(func=_server)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
