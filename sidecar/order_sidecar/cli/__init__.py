"""The ``order-sidecar`` command: one module per subcommand, imported only when it runs.

``serve``, ``verify``, ``status`` and ``dlq`` live here. Tools that ship beside the
sidecar (``bench``, ``demo``) plug in through the ``order_sidecar.commands`` entry-point
group, so the sidecar never imports them and ``serve`` loads neither.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from types import ModuleType

from order_sidecar import __version__
from order_sidecar.core.errors import SidecarError

#: The sidecar's own subcommands, in the order ``--help`` lists them.
BUILTIN = {
    "serve": "order_sidecar.cli.serve",
    "verify": "order_sidecar.cli.verify",
    "status": "order_sidecar.cli.status",
    "dlq": "order_sidecar.cli.dlq",
}
PLUGIN_GROUP = "order_sidecar.commands"


def command_modules() -> dict[str, str]:
    """Every subcommand and the module that implements it (nothing is imported)."""
    commands = dict(BUILTIN)
    for point in entry_points(group=PLUGIN_GROUP):
        commands.setdefault(point.name, point.value)
    return commands


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with *only*, just that subcommand's module is imported.

    Each command module has ``HELP``, ``DESCRIPTION``, ``configure(parser)`` and
    ``run(args) -> int``.
    """
    parser = argparse.ArgumentParser(
        prog="order-sidecar",
        description="Publish entity change events to NATS JetStream in per-entity order.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module_name in command_modules().items():
        if only is not None and name != only:
            commands.add_parser(name)  # known, so argparse accepts and lists it
            continue
        module = _load(module_name)
        sub = commands.add_parser(name, help=module.HELP, description=module.DESCRIPTION)
        module.configure(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    chosen = next((arg for arg in args_list if not arg.startswith("-")), None)
    known = command_modules()
    args = build_parser(chosen if chosen in known else None).parse_args(args_list)
    try:
        return int(_load(known[args.command]).run(args))
    except SidecarError as error:
        print(f"order-sidecar: error: {error}", file=sys.stderr)
        return 2


def _load(module_name: str) -> ModuleType:
    return importlib.import_module(module_name.partition(":")[0])
