"""Subcommands of ``canaryd``; each module exposes ``register(subparsers)``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

Register = Callable[["argparse._SubParsersAction[Any]"], None]


def _commands() -> list[Register]:
    from canaryd.commands import devstack, run

    found: list[Register] = [run.register, devstack.register]
    try:  # the control CLI (status, promote, ...) lives in its own module
        from canaryd.commands import control
    except ImportError:
        return found
    return [*found, control.register]


COMMANDS: list[Register] = _commands()
