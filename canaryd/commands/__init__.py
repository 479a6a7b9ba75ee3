"""Subcommands of ``canaryd``; each module exposes ``register(subparsers)``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from canaryd.commands import control, demo, devstack, run

Register = Callable[["argparse._SubParsersAction[Any]"], None]

COMMANDS: list[Register] = [run.register, control.register, demo.register, devstack.register]
