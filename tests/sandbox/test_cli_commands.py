"""The ``sandbox`` root builds only the command a call runs (``sandbox.cli.main.COMMANDS``).

The table names each top-level command's module; these tests hold it to the modules
themselves: every command a module defines is in the table under that module, in the order
and with the help ``sandbox --help`` showed when the root registered them all. That a call
imports no other command's module is checked with the read commands' imports
(``tests/test_house.py``).
"""

from __future__ import annotations

import importlib

import click
import typer
import typer.main

from sandbox.cli import main as cli_main

#: the modules under ``sandbox.cli`` that define commands, in the order the root once
#: registered them (``--help`` lists commands, then groups, each in registration order)
MODULES = [
    ("zone_cmds", "register"),
    ("serve", "register"),
    ("users", "app"),
    ("datasets", "app"),
    ("projects", "app"),
    ("access", "app"),
    ("jobs", "register"),
    ("jobs", "register_quote"),
    ("tune", "register"),
    ("jobs", "app"),
    ("models", "app"),
    ("budget", "register"),
    ("audit", "app"),
    ("synth", "app"),
    ("query", "app"),
    ("demo", "register"),
    ("notebook", "register"),
]
GROUP_NAMES = {
    "users": "user",
    "datasets": "dataset",
    "projects": "project",
    "models": "model",
}


def _eager_root() -> click.Group:
    """Every module's commands on one Typer, as the root was built before it was lazy."""
    root = typer.Typer()

    @root.callback()
    def _cb() -> None:
        pass

    for module_name, joins in MODULES:
        module = importlib.import_module(f"sandbox.cli.{module_name}")
        if joins == "app":
            root.add_typer(module.app, name=GROUP_NAMES.get(module_name, module_name))
        else:
            getattr(module, joins)(root)
    group = typer.main.get_group(root)
    assert isinstance(group, click.Group)
    return group


def test_the_table_lists_every_command_of_every_module_in_the_help_order() -> None:
    eager = _eager_root()
    lazy = typer.main.get_command(cli_main.app)
    assert isinstance(lazy, click.Group)
    ctx = click.Context(lazy)
    names = lazy.list_commands(ctx)
    assert names == eager.list_commands(click.Context(eager)), names
    for name in names:
        built, want = lazy.get_command(ctx, name), eager.commands[name]
        assert built is not None, name
        assert type(built) is type(want), name
        assert built.help == want.help, name
        assert [p.name for p in built.params] == [p.name for p in want.params], name
        if isinstance(want, click.Group):
            assert isinstance(built, click.Group)
            assert sorted(built.commands) == sorted(want.commands), name
    assert lazy.get_command(ctx, "no-such-command") is None
