"""``canaryd completion``: the scripts are generated from the parser (pure); bash runs them in test_cli."""

from __future__ import annotations

import argparse

import pytest

from canaryd import completion
from canaryd.cli import PLUGIN_PROG, build_parser


def test_tree_reads_every_command_option_and_choice() -> None:
    tree = {c.path: c for c in completion.commands(build_parser())}
    assert {"", "status", "promote", "retry", "check", "completion", "version", "run"} <= set(tree)
    status = {f: o for o in tree["status"].options for f in o.flags}
    assert status["-o"].choices == ("table", "wide", "json", "yaml") and status["-o"].takes_value
    assert status["--kubeconfig"].files and not status["-n"].files
    assert not status["--watch"].takes_value and status["-l"] is status["--selector"]
    assert "--full" in {f for o in tree["promote"].options for f in o.flags}
    assert tree["completion"].choices == completion.SHELLS
    assert {"--version", "--debug"} <= {f for o in tree[""].options for f in o.flags}


@pytest.mark.parametrize("shell", completion.SHELLS)
def test_every_command_and_flag_is_in_each_script(shell: str) -> None:
    parser = build_parser()
    text = completion.script(parser, shell)
    for c in completion.commands(parser):
        for name, _ in c.subcommands:
            assert name in text, (shell, name)
        for o in c.options:
            for flag in o.flags:
                assert flag.lstrip("-") in text, (shell, c.path, flag)
    assert "table wide json yaml" in text


def test_a_new_option_needs_no_change_here() -> None:
    # Any parser: nested subcommands, choices and file arguments come from argparse itself.
    p = argparse.ArgumentParser(prog="tool")
    sub = p.add_subparsers()
    deploy = sub.add_parser("deploy", help="ship it")
    deploy.add_argument("--color", choices=("red", "green"))
    deploy.add_argument("--config-file")
    inner = deploy.add_subparsers().add_parser("now", help="at once")
    inner.add_argument("--force", action="store_true")
    tree = {c.path: c for c in completion.commands(p)}
    assert tree["deploy"].subcommands == (("now", "at once"),)
    assert [o.flags for o in tree["deploy now"].options] == [("-h", "--help"), ("--force",)]
    bash = completion.script(p, "bash")
    assert '"deploy|now") cmdpath="deploy now"' in bash and "complete -F _tool tool" in bash
    assert '"deploy|--color") COMPREPLY=($(compgen -W "red green"' in bash
    assert '"deploy|--config-file") COMPREPLY=($(compgen -f' in bash
    fish = completion.script(p, "fish")
    assert "-l color -x -a 'red green'" in fish and "-l config-file -r -F" in fish


def test_the_kubectl_plugin_parser_completes_the_canaryd_command() -> None:
    # kubectl's own completion does not call this script; the command it completes is canaryd.
    text = completion.script(build_parser(PLUGIN_PROG), "bash")
    assert text.rstrip().endswith("complete -F _canaryd canaryd")
