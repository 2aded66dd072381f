"""``python -m dtm_ds export RUN_DIR OUT_DIR``, ``python -m dtm_ds visualize RUN_DIR --out PNG`` and
``python -m dtm_ds pilot --model M --data D``, through
dtm_ds.cli: ``--help`` per command, an unknown or mistyped flag refused before any work (exit 2)."""

import sys

from dtm_ds import cli
from dtm_ds.pilot import pilot
from dtm_ds.pretrained import export
from dtm_ds.visualize import visualize

COMMANDS = {"export": export, "pilot": pilot, "visualize": visualize}

if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    if name not in COMMANDS:
        print(f"usage: python -m dtm_ds {{{','.join(COMMANDS)}}} ... [--help]"
              + (f"\nerror: unknown command {name!r}" if name not in ("", "-h", "--help") else ""),
              file=sys.stderr if name not in ("-h", "--help") else sys.stdout)  # fmt: skip
        sys.exit(0 if name in ("-h", "--help") else 2)
    main = COMMANDS[name]
    sys.argv = [f"{sys.argv[0]} {name}", *sys.argv[2:]]
    usage = f"python -m dtm_ds {name} ...\n\n{(main.__doc__ or '').strip().splitlines()[0]}"
    cli.run(main, lambda: cli.describe(usage, [("Options", cli.function_rows(main))]))
