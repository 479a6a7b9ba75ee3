"""The devkit's subcommands, offered by ``canaryd`` in a checkout (``canaryd devstack|demo``)."""

from __future__ import annotations

from devkit import cmd_demo, cmd_devstack

COMMANDS = [cmd_demo.register, cmd_devstack.register]
