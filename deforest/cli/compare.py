"""``deforest-compare DIR [DIR ...]``: summarise multiruns of loss schemes into comparison.md/.csv."""

from __future__ import annotations

import argparse

from deforest.compare import write_comparison


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="deforest-compare", description=__doc__)
    parser.add_argument("multirun_dirs", nargs="+", help="Hydra multirun directories (logs/train/multiruns/<time>), pooled")
    parser.add_argument("--out", help="where to write comparison.md/.csv (default: the first directory)")
    parser.add_argument("--rare", type=int, default=2, help="report recall of the K rarest training classes")
    args = parser.parse_args(argv)
    csv_path, md_path = write_comparison(args.multirun_dirs, args.rare, args.out)
    print(md_path.read_text())
    print(f"wrote {md_path} and {csv_path}")


if __name__ == "__main__":
    main()
