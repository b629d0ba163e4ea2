"""Run one benchmark: ``python -m benchmarks NAME [--json] [options]``.

Each benchmark is a module ``benchmarks/NAME.py`` that defines::

    DESCRIPTION: str
    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> dict[str, object]: ...

``run`` measures the baseline in the same run and returns one JSON-able dict; the
keys of each benchmark are documented in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import pkgutil
import sys
from importlib import import_module
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nbenchmarks: " + (", ".join(names) or "(none yet)"))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"benchmarks: unknown benchmark {name!r}; choose one of: {', '.join(names)}", file=sys.stderr)
        return 2
    module = import_module(f"benchmarks.{name}")
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=module.DESCRIPTION)
    parser.add_argument("--json", action="store_true", help="print one JSON object (the default output too)")
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    result = module.run(args)
    result.setdefault("benchmark", name)
    print(json.dumps(result, indent=None if args.json else 2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
