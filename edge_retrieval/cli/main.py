"""``edge-retrieval`` command line: a table of subcommands, each built by its own module.

Subcommand modules are imported only when their command runs, so ``edge-retrieval run`` never
imports the export stage (torch). Each module exposes ``add_arguments(parser)`` and
``main(args) -> int``. Project errors become one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__
from ..errors import EdgeRetrievalError

# command -> (module, one-line help). Modules live where their job lives.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("edge_retrieval.cli.commands.run", "listen to a source and raise events for text queries"),
    "demo": ("edge_retrieval.cli.commands.demo", "build the default bundle if needed and stream a real recording"),
    "explain": ("edge_retrieval.cli.commands.explain", "show what a text query resolves to"),
    "index": ("edge_retrieval.cli.commands.archive", "embed a folder of recordings for search"),
    "search": ("edge_retrieval.cli.commands.archive_search", "rank indexed windows by a text query"),
    "export": ("edge_retrieval.export.cli", "build a model bundle (workstation; needs the export extra)"),
    "bundle": ("edge_retrieval.cli.commands.bundle", "verify or slim a model bundle"),
    "server": ("edge_retrieval.cli.commands.server", "run the fleet server (MQTT + SQLite)"),
    "alerts": ("edge_retrieval.cli.commands.alerts", "add, list, remove text alerts for the fleet"),
    "users": ("edge_retrieval.cli.commands.users", "add, list, remove ranger console accounts"),
    "detections": ("edge_retrieval.cli.commands.detections", "read stored detections"),
    "keys": ("edge_retrieval.cli.commands.keys", "create the Ed25519 key pair that signs queries"),
    "config": ("edge_retrieval.cli.commands.config", "check or show a device config"),
    "install-service": ("edge_retrieval.cli.commands.service", "write a systemd unit for the daemon"),
    "bench": ("edge_retrieval.benchmarks.cli", "latency and memory benchmarks"),
    "evaluate": ("edge_retrieval.benchmarks.evaluate", "retrieval quality: Recall@K, median rank, mAP@10"),
    "train": ("edge_retrieval.export.train", "train a mixture of audio experts (needs the train extra)"),
}


class Parser(argparse.ArgumentParser):
    """argparse with one error line and a "did you mean" for a mistyped option
    (argparse's own ``suggest_on_error`` exists only from Python 3.14)."""

    def _options(self) -> list[str]:
        opts = []
        for a in self._actions:
            opts += a.option_strings
            if isinstance(a, argparse._SubParsersAction):  # options of `bundle verify` etc.
                for sub in a.choices.values():
                    opts += sub._options() if isinstance(sub, Parser) else []
        return opts

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201
        self._argv = list(sys.argv[1:] if args is None else args)  # for error(): which tokens were typed
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        opts = self._options()
        hints = []
        for tok in getattr(self, "_argv", []):
            name = tok.split("=")[0]
            if not name.startswith("--") or any(o.startswith(name) for o in opts):
                continue  # a value, or a known option (or an abbreviation argparse accepts)
            close = difflib.get_close_matches(name, opts, n=1)
            if close:
                hints.append(f"{close[0]} for {name}")
        if hints:
            message += f" (did you mean {', '.join(hints)}?)"
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def suggest_command(cmd: str) -> str:
    """' (did you mean ...?)' for a mistyped command, or ''."""
    close = difflib.get_close_matches(cmd, list(COMMANDS), n=2)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def _load(cmd: str):  # noqa: ANN202
    module, _ = COMMANDS[cmd]
    return importlib.import_module(module)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-retrieval",
        description="Natural-language audio retrieval on field devices.",
        epilog="commands:\n" + "\n".join(f"  {k:<16} {h}" for k, (_, h) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    p.add_argument("--version", action="version", version=f"edge-retrieval {__version__}")
    p.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help="see the list below")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    # split global options / command / command arguments
    verbose = 0
    while argv and argv[0] in ("-v", "-vv", "--verbose"):
        verbose += 2 if argv.pop(0) == "-vv" else 1
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"edge-retrieval {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"edge-retrieval: error: unknown command {cmd!r}{suggest_command(cmd)} "
              "(see: edge-retrieval --help)", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        mod = _load(cmd)
        sub = Parser(prog=f"edge-retrieval {cmd}", description=COMMANDS[cmd][1])
        mod.add_arguments(sub)
        args = sub.parse_args(rest)
        return int(mod.main(args) or 0)
    except EdgeRetrievalError as exc:
        print(f"edge-retrieval {cmd}: error: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        print(f"edge-retrieval {cmd}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edge-retrieval {cmd}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
