"""``ctr serve``: its flags are :class:`ctr.serving.http.config.ServeConfig`'s fields,
defaults included (building the parser imports the server, so ``ctr.cli.main`` builds it only
for ``serve``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ctr.cli.common import HelpFormatter, add_fields, config_values, field_default

HELP = {"serve": "serve an artifact over HTTP (micro-batching, metrics, hot swap)"}
EPILOG_SERVE = """examples:
  ctr serve artifacts/deepfm --port 8080
  ctr serve artifacts/versions/ --max-batch 4096 --max-delay-ms 2   # newest version, hot swap
  ctr serve artifacts/deepfm --workers 2                           # two processes, one port
  curl -s localhost:8080/v1/predict -H 'content-type: application/json' \\
       -d '{"instances": [{"C1": "68fd1e64", "I1": 3}]}'
Reload: POST /v1/reload or SIGHUP (a directory of versions is also polled)."""

# ServeConfig fields that are `ctr serve` flags (``--max-batch`` for max_batch, ...), in help
# order; each default is the field's. ``max_body_bytes`` is given in MiB (--max-body-mb).
SERVE_FLAGS = {
    "max_batch": "rows per model forward",
    "max_delay_ms": "wait this long for more rows (0: a batch is what queued during the last "
    "forward)",
    "max_rows": "rows per request (else 413)",
}
SERVE_FLAGS_AFTER_BODY = {
    "max_queue_rows": "rows waiting before 503s",
    "poll_s": "version-directory poll interval",
    "workers": "server processes on the port (one a core), sharing the loaded tables; each "
    "has its own queue and /metrics",
}


def add_parsers(sub: Any) -> None:
    from ctr.serving.http.config import MiB, ServeConfig

    p = sub.add_parser(
        "serve", help=HELP["serve"], epilog=EPILOG_SERVE, formatter_class=HelpFormatter
    )
    p.add_argument("artifact", type=Path, help="an artifact, or a directory of artifact versions")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    add_fields(p, ServeConfig, SERVE_FLAGS)
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=field_default(ServeConfig, "max_body_bytes") / MiB,
        help="request body limit (413)",
    )
    add_fields(p, ServeConfig, SERVE_FLAGS_AFTER_BODY)
    p.add_argument(
        "--serving-opt",
        action="append",
        metavar="KIND.OPTION=VALUE",
        help="an option of the artifact's serving module (repeatable), e.g. binary.decode=auto: "
        "binary's bits (default) holds the artifact's bytes; auto/planes/rows serve fbgemm "
        "rows, faster and larger (/v1/metadata: resident_bytes)",
    )
    p.add_argument(
        "--binary-decode",
        choices=("bits", "auto", "planes", "rows"),
        default=None,
        help="deprecated (one release): --serving-opt binary.decode=...",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from ctr.serving.http.app import serve
    from ctr.serving.http.config import MiB, ServeConfig, parse_serving_options

    options = parse_serving_options(args.serving_opt)
    if args.binary_decode is not None:
        print(
            "warning: --binary-decode is deprecated; use --serving-opt "
            f"binary.decode={args.binary_decode}",
            file=sys.stderr,
        )
        options.setdefault("binary.decode", args.binary_decode)
    config = ServeConfig(
        **config_values(args, [*SERVE_FLAGS, *SERVE_FLAGS_AFTER_BODY]),
        max_body_bytes=int(args.max_body_mb * MiB),
        serving_options=options,
    )
    serve(args.artifact, args.host, args.port, config)
    return 0
