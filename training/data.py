"""Training data: JSONL, E2E CSV, WebNLG 2017 XML and DART JSON, linearised as in the paper
(Li & Liang 2021, appendix A.1), and the low-data draws of its section 6.3.

Every loader returns `Example`s. References of one input share a `table` id, so a draw or a
dev split never puts one table on both sides.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Sequence

FORMATS = ("auto", "jsonl", "e2e", "webnlg", "dart")


class DataError(ValueError):
    """Training data that cannot be read; the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Example:
    input: str
    output: str
    table: str  # examples with the same table are references of one input
    category: str | None = None  # WebNLG category (seen/unseen splits)


# E2E attribute names as written in the paper's data (appendix A.1).
E2E_FIELDS = {
    "name": "name", "eatType": "Type", "food": "food", "priceRange": "price",
    "customer rating": "customer rating", "area": "area", "familyFriendly": "family friendly",
    "near": "near",
}
_E2E_PAIR = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*,?")


def linearise_e2e(mr: str) -> str:
    """`name[The Eagle], eatType[coffee shop]` -> `name : The Eagle | Type : coffee shop`."""
    pairs = _E2E_PAIR.findall(mr)
    if not pairs or "".join(_E2E_PAIR.sub("", mr).split()):
        raise ValueError(f"not an E2E meaning representation: {mr!r}")
    return " | ".join(f"{E2E_FIELDS.get(field, field)} : {value}" for field, value in pairs)


def linearise_triples(triples: Iterable[Sequence[str]]) -> str:
    """Triples (s, r, o) -> `s1 : r1 : o1 | s2 : r2 : o2` (WebNLG and DART)."""
    return " | ".join(" : ".join(part.strip() for part in triple) for triple in triples)


def load_examples(path: str | Path, fmt: str = "auto") -> list[Example]:
    """Read a data file (or, for WebNLG, a folder of XML files) in the given format;
    `auto` goes by the extension: .jsonl, .csv (E2E), .xml or a folder (WebNLG), .json (DART)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder.")
    if fmt == "auto":
        fmt = _guess_format(path)
    loader = {"jsonl": _load_jsonl, "e2e": _load_e2e, "webnlg": _load_webnlg, "dart": _load_dart}.get(fmt)
    if loader is None:
        raise DataError(f"unknown data format '{fmt}'; use one of {', '.join(FORMATS)}.")
    examples = loader(path)
    if not examples:
        raise DataError(f"{path}: no examples found.")
    return examples


def _guess_format(path: Path) -> str:
    if path.is_dir():
        return "webnlg"
    suffix = path.suffix.lower()
    guess = {".jsonl": "jsonl", ".csv": "e2e", ".xml": "webnlg", ".json": "dart"}.get(suffix)
    if guess is None:
        raise DataError(
            f"{path}: cannot tell the format from the extension '{suffix}'; "
            f"pass --format ({', '.join(FORMATS[1:])})."
        )
    return guess


def _load_jsonl(path: Path) -> list[Example]:
    """One JSON object per line with `input` and `output`; several lines with the same input
    are several references of one table. An `output` may also be a list of references."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text, outputs = record["input"], record["output"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(
                    f"{path}, line {number}: expected a JSON object with 'input' and 'output' ({e})."
                ) from None
            for output in outputs if isinstance(outputs, list) else [outputs]:
                if not isinstance(text, str) or not isinstance(output, str):
                    raise DataError(f"{path}, line {number}: 'input' and 'output' must be strings.")
                examples.append(Example(text, output, table=text, category=record.get("category")))
    return examples


def _load_e2e(path: Path) -> list[Example]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"mr", "ref"} <= set(reader.fieldnames):
            raise DataError(f"{path}: an E2E CSV needs the columns 'mr' and 'ref' (found {reader.fieldnames}).")
        examples = []
        for number, row in enumerate(reader, 2):
            try:
                text = linearise_e2e(row["mr"])
            except ValueError as e:
                raise DataError(f"{path}, line {number}: {e}.") from None
            examples.append(Example(text, row["ref"].strip(), table=row["mr"].strip()))
    return examples


def _load_webnlg(path: Path) -> list[Example]:
    files = sorted(path.rglob("*.xml")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no WebNLG .xml files in this folder.")
    examples = []
    for file in files:
        try:
            root = ET.parse(file).getroot()
        except ET.ParseError as e:
            raise DataError(f"{file}: not valid XML ({e}).") from None
        for entry in root.iter("entry"):
            # DBpedia identifiers made readable: underscores to spaces, literal quotes dropped.
            triples = [
                [part.replace("_", " ").strip().strip('"') for part in (t.text or "").split(" | ")]
                for t in entry.iter("mtriple")
            ]
            if not triples or any(len(t) != 3 for t in triples):
                raise DataError(f"{file}: entry {entry.get('eid')} has a malformed <mtriple>.")
            text = linearise_triples(triples)
            table = f"{file.name}#{entry.get('category')}/{entry.get('size')}/{entry.get('eid')}"
            for lex in entry.iter("lex"):
                if lex.text and lex.text.strip():
                    examples.append(Example(text, " ".join(lex.text.split()), table, entry.get("category")))
    return examples


def _load_dart(path: Path) -> list[Example]:
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: a DART file is a JSON list of records with 'tripleset' and 'annotations'.")
    examples = []
    for index, record in enumerate(records):
        try:
            text = linearise_triples(record["tripleset"])
            texts = [a["text"] for a in record["annotations"]]
        except (KeyError, TypeError) as e:
            raise DataError(f"{path}: record {index} lacks 'tripleset' or 'annotations' ({e}).") from None
        for output in texts:
            examples.append(Example(text, output.strip(), table=f"dart#{index}"))
    return examples


def split_e2e_csv(source: Path, n_test: int, seed: int, test_path: Path, rest_path: Path) -> int:
    """Split an E2E CSV by meaning representation: n_test whole tables, drawn with `seed`, go to
    test_path, every other row to rest_path. Returns the number of tables left for training."""
    with open(source, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    mrs = sorted({r["mr"].strip() for r in rows})
    random.Random(seed).shuffle(mrs)
    test = set(mrs[:n_test])
    for path, in_test in ((test_path, True), (rest_path, False)):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["mr", "ref"], lineterminator="\n")
            writer.writeheader()
            writer.writerows({"mr": r["mr"], "ref": r["ref"]} for r in rows if (r["mr"].strip() in test) == in_test)
    return len(mrs) - n_test


def webnlg_entries(folder: Path) -> list[ET.Element]:
    """Every <entry> of the WebNLG XML files below folder, in file order."""
    found: list[ET.Element] = []
    for file in sorted(folder.rglob("*.xml")):
        found += list(ET.parse(file).getroot().iter("entry"))
    return found


def write_webnlg_entries(entries: Sequence[ET.Element], path: Path) -> None:
    """Write entries as one WebNLG XML file, renumbered Id1, Id2, … so their ids stay unique."""
    root = ET.Element("benchmark")
    container = ET.SubElement(root, "entries")
    for number, entry in enumerate(entries, 1):
        entry.set("eid", f"Id{number}")
        container.append(entry)
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def tables(examples: Sequence[Example]) -> dict[str, list[Example]]:
    """Examples grouped by table, in first-seen order."""
    grouped: dict[str, list[Example]] = {}
    for example in examples:
        grouped.setdefault(example.table, []).append(example)
    return grouped


def draw(
    examples: Sequence[Example],
    limit: int | None = None,
    dev_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[list[Example], list[Example]]:
    """Split into (train, dev) by table, never one table on both sides.

    With `limit`, tables are drawn in a seeded random order until the training set holds
    `limit` examples (the last table may lend only some of its references), then the dev set
    takes the next tables up to `round(dev_fraction * limit)` examples: the low-data setting
    of the paper's section 6.3. Without it, a seeded `dev_fraction` of the tables is held out.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, not {limit}.")
    if not 0.0 <= dev_fraction < 1.0:
        raise ValueError(f"--dev-fraction must be in [0, 1), not {dev_fraction}.")
    grouped = list(tables(examples).values())
    random.Random(seed).shuffle(grouped)
    if limit is None:
        n_dev_tables = round(dev_fraction * len(grouped))
        if dev_fraction > 0 and n_dev_tables == 0:
            n_dev_tables = 1
        dev = [e for group in grouped[:n_dev_tables] for e in group]
        train = [e for group in grouped[n_dev_tables:] for e in group]
    else:
        want_dev = round(dev_fraction * limit)
        train, dev = [], []
        remaining = iter(grouped)
        for group in remaining:
            train.extend(group[: limit - len(train)])
            if len(train) >= limit:
                break
        for group in remaining:
            if len(dev) >= want_dev:
                break
            dev.extend(group[: want_dev - len(dev)])
        if len(train) < limit:
            raise ValueError(f"--limit {limit}: the data holds only {len(train)} examples.")
        if len(dev) < want_dev:
            raise ValueError(
                f"--dev-fraction {dev_fraction} wants {want_dev} dev examples beside {limit} "
                f"training ones, but only {len(dev)} remain."
            )
    if not train:
        raise ValueError("no training examples left after holding out the dev split.")
    return train, dev


def summary(path: str | Path, fmt: str, train: Sequence[Example], dev: Sequence[Example], **draw_settings) -> dict:
    """What a prefix's meta says about its data."""
    return {
        "source": str(path),
        "format": fmt,
        "train_examples": len(train),
        "train_tables": len(tables(train)),
        "dev_examples": len(dev),
        "dev_tables": len(tables(dev)),
        **draw_settings,
    }
