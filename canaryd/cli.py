"""The ``canaryd`` command: one parser, subcommands registered by ``canaryd.commands.*``.

Errors we raise on purpose print as one line with what to do; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from canaryd import __version__
from canaryd.errors import CanarydError

EPILOG = """examples:
  canaryd run                              # the controller (in-cluster or with KUBECONFIG)
  canaryd status -A                        # every rollout
  canaryd promote whoami -n shop           # skip to 100%
"""


def build_parser() -> argparse.ArgumentParser:
    from canaryd.commands import COMMANDS, dev_commands

    parser = argparse.ArgumentParser(
        prog="canaryd",
        description="Progressive delivery for Gateway API (GAMMA) HTTPRoutes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=lambda _args: print(f"canaryd {__version__}") or 0)
    for register in [*COMMANDS, *dev_commands()]:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CanarydError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
