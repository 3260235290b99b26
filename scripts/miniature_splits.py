"""One row of the miniature report on its held-out scenes and on scenes of the training combinations: the report's
references pair each shape with colours and backgrounds no model was trained on (`world.HELD_OUT`); the same row on
scenes of combinations seen in training tells a gap that is generalisation from one that is not learnt at all.
Prints both accuracies per attribute and the judge's commonest misreadings. docs/miniature.md, "Where image prompts
lose shape and pattern".

    python scripts/miniature_splits.py --n 192 "IP-Adapter, image only"
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import asdict

import torch

from ipadapter.miniature.models import Loaded, Models
from ipadapter.miniature.quality import CONDITIONS, Inputs, Size, generate
from ipadapter.miniature.world import ATTRIBUTES


def main() -> None:
    names = [c.name for c in CONDITIONS if c.references == "world"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("row", choices=names, metavar="ROW", help="a condition name of the report")
    parser.add_argument("--models", help="a model folder (default: the bundled models)")
    parser.add_argument("--n", type=int, default=192, help="references per split (the report's seeds)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    condition = next(c for c in CONDITIONS if c.name == args.row)
    loaded = Loaded(Models.from_folder(args.models) if args.models else Models.bundled())
    judge = loaded.judge()
    right, misread = {}, {}
    for split in ("heldout", "train"):
        inputs = Inputs.build(args.n, split)
        refs, prompts, truth = inputs.for_condition(condition)
        read = judge.predict(generate(loaded, condition, refs, prompts, inputs.masks, Size(references=args.n)))
        asked = [asdict(t) for t in truth]
        right[split] = {a: sum(r[a] == t[a] for r, t in zip(read, asked)) for a in ATTRIBUTES}
        misread[split] = {a: Counter(f"{t[a]} → {r[a]}" for r, t in zip(read, asked) if r[a] != t[a]).most_common(3)
                          for a in ATTRIBUTES}
    print(f"{args.row}, {args.n} references per split\n")
    print("| attribute | held-out combinations | training combinations | commonest misreadings (held-out; training) |")
    print("|---|---|---|---|")
    for a in ATTRIBUTES:
        words = "; ".join(", ".join(f"{m} ({k})" for m, k in misread[s][a]) or "–" for s in ("heldout", "train"))
        print(f"| {a} | {right['heldout'][a]}/{args.n} | {right['train'][a]}/{args.n} | {words} |")


if __name__ == "__main__":
    main()
