"""python -m dist_dejpeg.config [--write docs/CONFIG.md]: print the config reference, or rewrite a page's."""

import argparse

from dist_dejpeg.config.reference import reference_markdown, write_reference


def main(argv: list[str] | None = None) -> None:
    # argparse, not a look at sys.argv: `--help`, `--write` without its page or a misspelt option printed the whole
    # reference as if nothing were wrong
    parser = argparse.ArgumentParser(prog="python -m dist_dejpeg.config",
                                     description="Print every config key (type, default, meaning) as markdown "
                                                 "tables, or rewrite them between a page's markers.")
    parser.add_argument("--write", metavar="PAGE", help="rewrite the tables in PAGE (docs/CONFIG.md)")
    args = parser.parse_args(argv)
    if args.write:
        try:
            write_reference(args.write)
        except (OSError, ValueError) as err:  # (a page without the markers was a ValueError from unpacking)
            parser.exit(2, f"error: {err}\n")
    else:
        print(reference_markdown())


if __name__ == "__main__":
    main()
