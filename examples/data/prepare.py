"""Write the small data sets the examples, the README and `make demo` use, from the full copies.

    python examples/data/prepare.py --shared ../shared/data

E2E (CC BY-SA 4.0): the challenge's development set, split by meaning representation into
train.csv and test.csv (100 tables, seeded), so that no test table is ever trained on.
WebNLG 2017 (CC BY-NC-SA 4.0): 400 entries of the training set (all 10 categories, 1-7
triples) as train.xml and 60 entries of the development set as test.xml, drawn with a seed.
Running it again gives byte-identical files.
"""

from __future__ import annotations

import csv
import random
import xml.etree.ElementTree as ET
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent


def split_e2e(source: Path, out: Path, n_test: int, seed: int) -> None:
    with open(source, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    mrs = sorted({r["mr"].strip() for r in rows})
    random.Random(seed).shuffle(mrs)
    test = set(mrs[:n_test])
    out.mkdir(parents=True, exist_ok=True)
    for name, keep in (("train.csv", False), ("test.csv", True)):
        with open(out / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["mr", "ref"], lineterminator="\n")
            writer.writeheader()
            writer.writerows({"mr": r["mr"], "ref": r["ref"]} for r in rows if (r["mr"].strip() in test) == keep)


def sample_webnlg(folder: Path, out: Path, n: int, seed: int) -> None:
    entries = []
    for file in sorted(folder.rglob("*.xml")):
        entries += list(ET.parse(file).getroot().iter("entry"))
    random.Random(seed).shuffle(entries)
    chosen = sorted(entries[:n], key=lambda e: (int(e.get("size")), e.get("category"), int(e.get("eid")[2:])))
    root = ET.Element("benchmark")
    container = ET.SubElement(root, "entries")
    for number, entry in enumerate(chosen, 1):
        entry.set("eid", f"Id{number}")  # unique within the new file
        entry.tail = None
        container.append(entry)
    ET.indent(root)
    out.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)


@click.command()
@click.option("--shared", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=HERE.parents[2] / "shared" / "data", show_default=True, help="The folder holding e2e/ and webnlg2017/.")
def main(shared: Path) -> None:
    """Write examples/data/e2e/{train,test}.csv and examples/data/webnlg/{train,test}.xml."""
    split_e2e(shared / "e2e" / "devset.csv", HERE / "e2e", n_test=100, seed=0)
    sample_webnlg(shared / "webnlg2017" / "train", HERE / "webnlg" / "train.xml", n=400, seed=0)
    sample_webnlg(shared / "webnlg2017" / "dev", HERE / "webnlg" / "test.xml", n=60, seed=0)
    for path in sorted(HERE.rglob("*.csv")) + sorted(HERE.rglob("*.xml")):
        click.echo(f"{path.relative_to(HERE)}  {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
