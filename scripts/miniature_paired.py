"""Two rows of the miniature report compared reference by reference: on the same references, which attribute each
row's images get right where the other's do not, and McNemar's exact test on those discordant pairs. Two rows of 96
images can differ by a few points by chance; a paired count says whether a gap is more than that.
docs/miniature.md, "Plus trained on to 20,000 steps".

    python scripts/miniature_paired.py --n 192 "IP-Adapter, image only" "IP-Adapter Plus, image only"
"""

from __future__ import annotations

import argparse

import torch
from scipy.stats import binomtest

from ipadapter.miniature.models import Loaded, Models
from ipadapter.miniature.quality import CONDITIONS, Inputs, Size, generate
from ipadapter.miniature.world import ATTRIBUTES


def main() -> None:
    names = [c.name for c in CONDITIONS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs=2, choices=names, metavar="ROW", help="two condition names of the report")
    parser.add_argument("--models", help="a model folder (default: the bundled models)")
    parser.add_argument("--n", type=int, default=192, help="held-out references (the report's seeds)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = Size(references=args.n)
    loaded = Loaded(Models.from_folder(args.models) if args.models else Models.bundled())
    judge, inputs = loaded.judge(), Inputs.build(args.n)
    right = []
    for name in args.rows:
        condition = next(c for c in CONDITIONS if c.name == name)
        refs, prompts, truth = inputs.for_condition(condition)
        right.append(judge.correct(generate(loaded, condition, refs, prompts, inputs.masks, size), truth))
    a_name, b_name = args.rows
    print(f"| attribute | {a_name} | {b_name} | only the first right | only the second right | McNemar p |")
    print("|---|---|---|---|---|---|")
    for attr in ATTRIBUTES:
        first = sum(x[attr] and not y[attr] for x, y in zip(*right))
        second = sum(y[attr] and not x[attr] for x, y in zip(*right))
        p = binomtest(first, first + second).pvalue if first + second else 1.0
        print(f"| {attr} | {sum(x[attr] for x in right[0])}/{args.n} | {sum(y[attr] for y in right[1])}/{args.n} "
              f"| {first} | {second} | {p:.3f} |")


if __name__ == "__main__":
    main()
