"""`mammospn`: the project's own tools (synthetic data, data preview, Table 1, demo).

Each subcommand lives with the code it drives; this file only dispatches. A module that provides
a subcommand exposes ``configure_parser(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from experiments.memory import keep_freed_memory

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("datamodules.synthetic", "write a synthetic mammogram set in the real DDSM / CBIS-DDSM formats"),
    "preview": ("datamodules.preview", "contact sheet of a data config: images, breast outline, lesions, patches"),
    "table1": ("experiments.table1", "train and evaluate every model and write the paper's Table 1"),
    "border-study": ("experiments.border_study", "the border-aware RAT-SPN scoring options side by side"),
    "score-study": ("experiments.score_study", "scoring rules for the CAE-RATSPN over saved grid scores, side by side"),
    "demo": ("experiments.demo", "a small end-to-end run on synthetic data"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mammospn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            sub_parser.set_defaults(_module=None, _missing=module_name)
            continue
        module.configure_parser(sub_parser)
        sub_parser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args._module is None:
        print(f"mammospn {args.command}: not available ({args._missing} is not installed)", file=sys.stderr)
        return 2
    keep_freed_memory()
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
