"""``medpruner serve``: start the HTTP service (:mod:`serve.app`) on Ray Serve until Ctrl-C.

    medpruner serve [--host H] [--port P] [key=value ...]

App args are :class:`serve.config.ServeAppConfig` fields as dotted ``key=value`` pairs; a bad
one is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from ray import serve

from pipeline.config import ConfigError
from serve.app import build_app


def main(argv: list[str] | None = None) -> int:
    """Start the HTTP service (serve.app) on Ray Serve until Ctrl-C; exit 2 on bad args."""
    parser = argparse.ArgumentParser(
        prog="medpruner serve", description="Start the HTTP service (serve.app) on Ray Serve; "
        "app args as dotted key=value, e.g. model=/ckpt pruning.tau=0.8")
    parser.add_argument("--host", default="127.0.0.1", help="bind address")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("args", nargs="*", metavar="key=value", help="ServeAppConfig fields")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    pairs = dict(item.partition("=")[::2] for item in args.args)
    try:
        app = build_app(pairs)
    except ConfigError as exc:
        print(f"medpruner: {exc}", file=sys.stderr)
        return 2
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, blocking=False)
    print(f"medpruner: serving on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
