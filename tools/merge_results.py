"""Merge the results.json of tools/evaluate.py into one table: one row per method, mean ± std over training runs.

    python tools/merge_results.py runs/paper/eval/results.json [more/results.json ...] --output runs/paper/table

Rows named METHOD@RUN (e.g. "KD@1" and "KD@2": KD trained with seeds 1 and 2) form the row METHOD:
per metric, each run's mean over the evaluation seeds, then the mean ± std (ddof = 1) of those over
the runs; a row without "@" is a method of one run (its mean alone). Writes OUTPUT.md (the table)
and OUTPUT.json (per method: the runs, each run's value and the mean and std; the source files) and
prints the table. docs/evaluation.md, "The paper's table". Errors: one line, exit status 2.
"""

import argparse
import json
import sys
from pathlib import Path

from megatron_minillm.evaluation.report import markdown_table, merge_results, to_json


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.json files of tools/evaluate.py")
    parser.add_argument("--output", required=True, help="path prefix: writes OUTPUT.md and OUTPUT.json")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    try:
        methods = merge_results([json.loads(Path(p).read_text(encoding="utf-8")) for p in args.results])
        table = markdown_table(methods)
        info = {"sources": [str(p) for p in args.results], "values": "per training run: its mean over seeds"}
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_name(out.name + ".json").write_text(
            json.dumps(to_json(methods, info), indent=2, allow_nan=False) + "\n", encoding="utf-8"
        )
        out.with_name(out.name + ".md").write_text(table, encoding="utf-8")
    except (OSError, ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
