"""The CPU rows of `bench train` and `bench infer` of an older commit and of this checkout, in turn in one run:
did a change make the CPU slower? (issue 24: "on CPU nothing gets slower").

    python benchmarks/experiments/before_after.py OLD_REV [--rounds 3] [--results benchmarks/results]

OLD_REV is checked out into a temporary git worktree; each side runs with its own tree first on PYTHONPATH (the
same interpreter and libraries) and its own configs/debug.yaml, in child processes, the rounds alternating old,
new, new, old, ... so that the machine's drift in speed falls on both sides alike. bench train: the naive and the
tuned rows of each update (`--rungs none`); bench infer: the PyTorch rows on the CPU (`--no-onnx --no-shell`
unless --onnx / --shell). Per row: the median ms over the rounds of each side and new / old (below 1: faster).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from dist_dejpeg.bench.common import write_results

REPO = Path(__file__).resolve().parents[2]


def run_side(tree: Path, which: str, out: Path, name: str, extra: list[str]) -> dict:
    """One ``dist-dejpeg bench <which>`` of the code in ``tree``; its results table {row: ms per call}."""
    env = dict(os.environ, PYTHONPATH=str(tree) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "dist_dejpeg.cli", "bench", which, "--results", str(out), "--name", name,
           "--config", "configs/debug.yaml", *extra]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    results = json.loads((out / f"{name}.json").read_text())["results"]
    if which == "infer":
        return {f"infer: {row}": r["ms_per_call"] for row, r in results.items() if "ms_per_call" in r}
    return {f"train {update}: {variant.split(':')[0]}": r["ms_per_call"]
            for variant, updates in results.items() for update, r in updates.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", help="the older commit (any git revision)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per side (default: 3)")
    p.add_argument("--onnx", action="store_true", help="bench infer's ONNX rows too (each exports the model)")
    p.add_argument("--shell", action="store_true", help="bench infer's shell rows too")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="folder of the results files")
    p.add_argument("--name", default="before-after", help="results file name (<name>.json and <name>.md)")
    args = p.parse_args(argv)
    old = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.old], capture_output=True, text=True)
    if old.returncode:
        p.error(f"not a revision of {REPO}: {args.old}")
    new = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    sides = {"old": old.stdout.strip(), "new": new.stdout.strip()}
    infer = ([] if args.onnx else ["--no-onnx"]) + ([] if args.shell else ["--no-shell"])
    work = Path(tempfile.mkdtemp(prefix="before_after."))
    tree = work / "old"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), sides["old"]], check=True)
    ms: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    try:
        for r in range(args.rounds):
            for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
                root = tree if side == "old" else REPO
                for which, extra in (("train", ["--rungs", "none"]), ("infer", infer)):
                    print(f"round {r + 1}/{args.rounds}: {side} ({sides[side]}) bench {which}", flush=True)
                    for row, value in run_side(root, which, work, f"{which}-{side}-{r}", extra).items():
                        ms[side].setdefault(row, []).append(value)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    rows, table = {}, []
    for row in [r for r in ms["new"] if r in ms["old"]]:
        o, n = statistics.median(ms["old"][row]), statistics.median(ms["new"][row])
        rows[row] = {"old_ms": o, "new_ms": n, "new_over_old": n / o, "old_rounds": ms["old"][row],
                     "new_rounds": ms["new"][row]}
        table.append([row, f"{o:.1f}", f"{n:.1f}", f"{n / o:.2f}"])
    note = (f"Old {sides['old']}, new {sides['new']}; {args.rounds} rounds per side, alternating (old, new, new, "
            f"old, ...), the median ms per call of each side; `bench train --rungs none` and `bench infer "
            f"{' '.join(infer)}` on configs/debug.yaml as each commit has it (benchmarks/experiments/before_after.py).")
    write_results(args.results, args.name, {"old": sides["old"], "new": sides["new"], "rounds": args.rounds,
                                            "results": rows}, "CPU rows before and after", note,
                  ["row", f"old {sides['old']} ms", f"new {sides['new']} ms", "new / old"], table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
