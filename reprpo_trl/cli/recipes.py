"""reprpo recipes: the training recipes, shift specs and sweep grids that ship with the package (reprpo_trl.packaged),
usable from any directory as pkg:<name>.

    reprpo recipes list                        every packaged file, with its first comment line
    reprpo recipes show dpo.yaml               print one
    reprpo recipes path sweeps/suite_methods.yaml        where it is installed
    reprpo recipes copy dpo.yaml sweeps/suite_methods.yaml --to myrecipes [--force]
                                               copy them out to edit, with the recipes and shift specs they name
"""

import argparse

from ..errors import command


def describe(name: str) -> str:
    """The first comment line of a packaged file."""
    from ..packaged import resolve

    lines = [line.lstrip("# ").strip() for line in resolve(name).read_text().splitlines() if line.startswith("#")]
    return lines[0] if lines else ""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reprpo recipes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="Every packaged recipe, shift spec and grid.")
    for name, text in (("show", "Print a packaged file."), ("path", "Print where a packaged file is installed.")):
        commands.add_parser(name, help=text).add_argument("name", help="As `list` names it (pkg: optional).")
    copy = commands.add_parser("copy", help="Copy packaged files (and the packaged files they name) to a directory.")
    copy.add_argument("names", nargs="+", help="As `list` names them (pkg: optional).")
    copy.add_argument("--to", required=True, help="Destination directory (the package's layout is kept under it).")
    copy.add_argument("--force", action="store_true", help="Overwrite files that exist with other contents.")
    return p


@command
def main(argv: list[str] | None = None) -> None:
    from .. import packaged

    args = parser().parse_args(argv)
    if args.command == "list":
        names = packaged.names()
        width = max(map(len, names)) + 4 + len(packaged.PREFIX)
        print("\n".join(f"{packaged.PREFIX + name:<{width}}{describe(name)[:100]}" for name in names))
    elif args.command == "show":
        print(packaged.resolve(args.name).read_text(), end="")
    elif args.command == "path":
        print(packaged.resolve(args.name))
    else:
        for path in packaged.copy(args.names, args.to, force=args.force):
            print("copied", path)
