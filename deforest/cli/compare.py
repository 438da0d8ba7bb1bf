"""``deforest-compare DIR``: summarise a multirun of loss schemes into comparison.md/.csv."""

from __future__ import annotations

import argparse

from deforest.compare import write_comparison


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="deforest-compare", description=__doc__)
    parser.add_argument("multirun_dir", help="a Hydra multirun directory (logs/train/multiruns/<time>)")
    parser.add_argument("--rare", type=int, default=2, help="report recall of the K rarest training classes")
    args = parser.parse_args(argv)
    csv_path, md_path = write_comparison(args.multirun_dir, args.rare)
    print(md_path.read_text())
    print(f"wrote {md_path} and {csv_path}")


if __name__ == "__main__":
    main()
