"""``cuju-libvirt config show``: the effective cujud configuration and where each value comes from."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cuju_libvirt import config
from cuju_libvirt.cli import EXIT_OK, CLIError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "config",
        help="show the cujud configuration",
        description="Inspect the configuration cujud reads (the same files, the same checks).",
    )
    sub = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = sub.add_parser(
        "show",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="print the effective configuration with the source of every value",
        description=(
            "Print the effective cujud configuration: the defaults, overridden by the main\n"
            "file, overridden by each drop-in in sorted order. Every line names the file\n"
            "its value came from, or 'default'. The output is itself a valid cujud.yaml."
        ),
        epilog=(
            "EXIT STATUS\n"
            "  0  the configuration is valid (it is printed)\n"
            "  1  a file is invalid: the message names the file, the key and the fix\n"
            "  2  the file named with --config does not exist"
        ),
    )
    show.add_argument("--config", type=Path, metavar="FILE",
                      help=f"main configuration file (default {config.DEFAULT_CONFIG_FILE})")
    show.add_argument("--config-dir", type=Path, metavar="DIR",
                      help="drop-in directory (default: cujud.d next to the main file)")
    show.add_argument("--json", action="store_true",
                      help="one JSON object: {'values': {...}, 'sources': {...}, 'files': [...]}")
    show.set_defaults(handler=run_show)


def run_show(args: argparse.Namespace) -> int:
    if args.config is not None and not args.config.exists():
        raise CLIError(f"configuration file {args.config} does not exist", exit_code=2)
    main_file: Path = args.config if args.config is not None else config.DEFAULT_CONFIG_FILE
    dropins: Path = args.config_dir if args.config_dir is not None else main_file.parent / "cujud.d"
    cfg = config.load(main_file, dropins)
    if args.json:
        print(json.dumps({"values": cfg.as_dict(), "sources": dict(cfg.sources),
                          "files": [str(p) for p in cfg.files]}, indent=2))
    else:
        print(config.render(cfg), end="")
    return EXIT_OK
