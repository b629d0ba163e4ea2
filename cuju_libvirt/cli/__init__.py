"""The ``cuju-libvirt`` command line.

Each sub-command family lives in its own module with a ``register(subparsers)``
function; this module only assembles them and maps errors to exit codes:

* 0: success
* 1: the input is understood but refused (invalid element, domain cannot be protected)
* 2: the input could not be read at all (missing file, not XML, not a domain), or bad usage

A :class:`~cuju_libvirt.errors.CujuError` becomes one line on stderr; ``--debug``
adds the traceback. No other exception escapes as a traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from importlib import import_module

from cuju_libvirt import __version__
from cuju_libvirt.errors import CujuError

LOG = logging.getLogger(__name__)

#: Modules under cuju_libvirt.cli that contribute sub-commands, in --help order.
COMMAND_MODULES = ("xml_cmd", "domain_cmd", "config_cmd", "tracker_cmd", "status_cmd", "ft_cmd", "doctor_cmd")

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_UNREADABLE = 2


class CLIError(CujuError):
    """An error with the exit code the CLI must end with."""

    def __init__(self, message: str, exit_code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cuju-libvirt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Fault tolerance for libvirt/QEMU virtual machines.\n\n"
            "A domain is protected by one <cuju:ft> element inside its <metadata>\n"
            "(namespace https://cuju-ft.github.io/libvirt/ft/1.0). These commands\n"
            "edit and check that element in domain XML files and defined domains."
        ),
        epilog=(
            "EXIT STATUS\n"
            "  0  success\n"
            "  1  input understood but refused (invalid element, domain cannot be protected)\n"
            "  2  input unreadable (missing file, not XML, not a domain) or bad usage\n\n"
            "Run 'cuju-libvirt COMMAND --help' for the options of one command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--debug", action="store_true", help="log at DEBUG level and show tracebacks on errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = import_module(f"cuju_libvirt.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"cuju_libvirt.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except CLIError as err:
        LOG.debug("command failed", exc_info=True)
        print(f"cuju-libvirt: {err}", file=sys.stderr)
        return err.exit_code
    except CujuError as err:
        LOG.debug("command failed", exc_info=True)
        print(f"cuju-libvirt: {err}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # last resort: one line unless --debug
        if args.debug:
            raise
        name = type(err).__name__
        print(f"cuju-libvirt: internal error: {name}: {err} (run with --debug)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
