"""The ``canaryd`` command: one parser, subcommands registered by ``canaryd.commands.*``.

Installed twice: ``canaryd`` and ``kubectl-canaryd``, the kubectl plugin (``kubectl canaryd status -A``),
whose help and usage say ``kubectl canaryd``. Errors we raise on purpose print as one line with what to do;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator, Sequence

from pydantic import ValidationError

from canaryd import __version__, completion
from canaryd.errors import CanarydError

PROG = "canaryd"
PLUGIN_PROG = "kubectl canaryd"
EPILOG = """examples:
  canaryd run                              # the controller (in-cluster or with KUBECONFIG)
  canaryd status -A                        # every rollout
  canaryd promote whoami -n shop           # skip to 100%
  kubectl canaryd status -A                # the same, as a kubectl plugin (kubectl-canaryd on PATH)
  source <(canaryd completion bash)        # tab completion (bash, zsh or fish)
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Each command's help on its own line: argparse counts subcommand names one indent short, so a name
    as long as ``completion`` would push its help to the next line."""

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction) and action.help is not argparse.SUPPRESS:
            names = [len(self._format_action_invocation(a)) for a in action._get_subactions()]
            self._action_max_length = max(self._action_max_length, max(names, default=0) + self._current_indent + 2)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from canaryd.commands import COMMANDS, dev_commands

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Progressive delivery for Gateway API (GAMMA) HTTPRoutes.",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"canaryd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=lambda _args: print(f"canaryd {__version__}") or 0)
    shells = sub.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print the tab-completion script for SHELL, generated from this command's own options.",
        epilog="examples:\n  source <(canaryd completion bash)                   # this shell; add it to ~/.bashrc\n"
        "  canaryd completion zsh > ~/.zfunc/_canaryd           # a directory in $fpath, then compinit\n"
        "  canaryd completion fish > ~/.config/fish/completions/canaryd.fish",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    shells.add_argument("shell", metavar="SHELL", choices=completion.SHELLS, help=", ".join(completion.SHELLS))
    shells.set_defaults(func=lambda args: print(completion.script(parser, args.shell), end="") or 0)
    for register in [*COMMANDS, *dev_commands()]:
        register(sub)
    if prog != PROG:
        for p in _parsers(parser):  # the examples say how this command is invoked
            p.epilog = p.epilog and re.sub(rf"(?m)^(\s+){PROG} ", rf"\g<1>{prog} ", p.epilog)
    return parser


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    parser = build_parser(prog)
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
    except ValidationError as exc:  # the settings (CANARYD_* and CANARYD_CONFIG_FILE), validated at start
        if args.debug:
            raise
        print(f"error: {settings_problem(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def kubectl_main() -> int:
    """The ``kubectl-canaryd`` entry point: kubectl runs it for ``kubectl canaryd ...``."""
    return main(prog=PLUGIN_PROG)


def settings_problem(exc: ValidationError) -> str:
    """Every invalid setting on one line, with where settings come from."""
    problems = "; ".join(
        f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()
    )
    return (
        f"invalid settings: {problems}; fix the settings file (CANARYD_CONFIG_FILE) or the CANARYD_* "
        "environment variable (nested keys with '__', e.g. CANARYD_DEFAULTS__STEPS)"
    )
