"""Subcommands of ``canaryd``; each module exposes ``register(subparsers)``.

In a checkout, the development kit (``devkit``: devstack, demo) adds its commands; it is not in the
wheel or the image, so an installed ``canaryd --help`` lists only commands that work there.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any

from canaryd.commands import control, run

Register = Callable[["argparse._SubParsersAction[Any]"], None]

COMMANDS: list[Register] = [run.register, control.register]


def dev_commands() -> list[Register]:
    """The devkit's commands when it is importable (a checkout), else none."""
    try:
        mod = importlib.import_module("devkit.commands")
    except ModuleNotFoundError as exc:
        if exc.name not in ("devkit", "devkit.commands"):
            raise
        return []
    found: list[Register] = mod.COMMANDS
    return found
