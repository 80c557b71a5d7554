"""Write the small data sets the examples, the README and `make demo` use, from the full copies.

    python examples/data/prepare.py --shared ../shared/data

E2E (CC BY-SA 4.0): the challenge's development set, split by meaning representation into
train.csv and test.csv (100 tables, seeded), so that no test table is ever trained on.
WebNLG 2017 (CC BY-NC-SA 4.0): 400 entries of the training set (all 10 categories, 1-7
triples) as train.xml and 60 entries of the development set as test.xml, drawn with a seed.
Running it again gives byte-identical files.
"""

from __future__ import annotations

import random
from pathlib import Path

import click

from prefixkit.training.data import split_e2e_csv, webnlg_entries, write_webnlg_entries

HERE = Path(__file__).resolve().parent


def sample_webnlg(folder: Path, out: Path, n: int, seed: int) -> None:
    entries = webnlg_entries(folder)
    random.Random(seed).shuffle(entries)
    chosen = sorted(entries[:n], key=lambda e: (int(e.get("size")), e.get("category"), int(e.get("eid")[2:])))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_webnlg_entries(chosen, out)


@click.command()
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=HERE.parents[2] / "shared" / "data", show_default=True, help="The folder holding e2e/ and webnlg2017/.")
def main(shared: Path) -> None:
    """Write examples/data/e2e/{train,test}.csv and examples/data/webnlg/{train,test}.xml."""
    (HERE / "e2e").mkdir(exist_ok=True)
    split_e2e_csv(shared / "e2e" / "devset.csv", n_test=100, seed=0, test_path=HERE / "e2e" / "test.csv",
                  rest_path=HERE / "e2e" / "train.csv")
    sample_webnlg(shared / "webnlg2017" / "train", HERE / "webnlg" / "train.xml", n=400, seed=0)
    sample_webnlg(shared / "webnlg2017" / "dev", HERE / "webnlg" / "test.xml", n=60, seed=0)
    for path in sorted(HERE.rglob("*.csv")) + sorted(HERE.rglob("*.xml")):
        click.echo(f"{path.relative_to(HERE)}  {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
