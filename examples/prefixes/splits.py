"""Write the data the shipped prefixes were tuned and trained on, from examples/data and ../shared/data.

    python examples/prefixes/splits.py --shared ../shared/data --out runs/prefixes

E2E: 45 of the 447 training tables of examples/data/e2e/train.csv, drawn with a seed, become
`e2e/dev.csv`; the other 402 are `e2e/fit.csv`. Settings are compared by training on fit.csv
and scoring on dev.csv; the shipped prefix then trains on all 447 tables. The 100 test tables
are never read.

WebNLG: `webnlg/dev.xml` holds 60 entries of the WebNLG 2017 development set that are not
among the 60 of examples/data/webnlg/test.xml (the same seeded draw, the next 60 entries).
Training reads the full training set folder directly (`--limit` says how much of it).
Running it again gives byte-identical files.
"""

from __future__ import annotations

import random
from pathlib import Path

import click

from prefixkit.training.data import split_e2e_csv, webnlg_entries, write_webnlg_entries

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"


@click.command()
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=HERE.parents[2] / "shared" / "data", show_default=True, help="The folder holding webnlg2017/.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/prefixes"),
              show_default=True)
def main(shared: Path, out: Path) -> None:
    """Write OUT/e2e/{fit,dev}.csv and OUT/webnlg/dev.xml."""
    (out / "e2e").mkdir(parents=True, exist_ok=True)
    (out / "webnlg").mkdir(parents=True, exist_ok=True)
    split_e2e_csv(DATA / "e2e" / "train.csv", n_test=45, seed=1, test_path=out / "e2e" / "dev.csv",
                  rest_path=out / "e2e" / "fit.csv")
    # The same shuffle examples/data/prepare.py draws test.xml from: its first 60 are the test
    # entries, the next 60 this dev set.
    entries = webnlg_entries(shared / "webnlg2017" / "dev")
    random.Random(0).shuffle(entries)
    chosen = sorted(entries[60:120], key=lambda e: (int(e.get("size")), e.get("category"), int(e.get("eid")[2:])))
    write_webnlg_entries(chosen, out / "webnlg" / "dev.xml")
    for path in sorted(out.rglob("*.csv")) + sorted(out.rglob("*.xml")):
        click.echo(f"{path}  {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
