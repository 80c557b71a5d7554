"""Every command in README.md runs as written.

The README's ```sh and ```python blocks are joined, in order, into one bash script (a Python
block becomes `python - <<'EOF' … EOF` at its place) and run in a scratch folder that links
what a checkout has beside the README: examples/, exports/, the Makefile and the files it
depends on, and .venv. So `make setup` finds the venv up to date (as `make test` left it), `make demo` runs for real
(and exports smollm2-135m into the checkout's exports/ if it is not there), and the README's
own `pt-export` then finds that export up to date, as it would for a user who ran the demo
first. One line is left out: `make test`, since this test runs inside it; a test below checks
that CI's `.ci/run` calls it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINKED = ("examples", "exports", "Makefile", "setup.cfg", "pyproject.toml", "constraints.txt", ".venv")
NOT_RUN = "make test"  # the suite itself; CI runs it (see test_ci_runs_make_test)


def blocks() -> list[tuple[str, str]]:
    """(language, body) of every sh and python block, indented ones (in a list item) too."""
    found = re.findall(r"^([ \t]*)```(sh|python)\n(.*?)^[ \t]*```", README.read_text(), flags=re.S | re.M)
    return [(kind, textwrap.dedent(body)) for _, kind, body in found]


def script() -> str:
    lines = ["set -eo pipefail", "set -x"]
    for kind, body in blocks():
        if kind == "python":
            lines += ["python - <<'PYTHON_BLOCK'", body.rstrip("\n"), "PYTHON_BLOCK"]
        else:
            lines += [line for line in body.rstrip("\n").splitlines() if line.split("#")[0].strip() != NOT_RUN]
    return "\n".join(lines) + "\n"


def test_readme_has_the_blocks_this_test_expects():
    found = blocks()
    assert sum(kind == "sh" for kind, _ in found) >= 8 and sum(kind == "python" for kind, _ in found) >= 2
    # Only the `make test` line is left out of the run.
    left_out = [line for _, body in found for line in body.splitlines() if line.split("#")[0].strip() == NOT_RUN]
    assert len(left_out) == 1


def test_ci_runs_make_test():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\s*make test\b", ci, flags=re.M), ".ci/run must call `make test`, as the README says"


def test_every_readme_command_runs_as_written(tmp_path):
    venv = ROOT / ".venv"
    if Path(sys.prefix).resolve() != venv.resolve():
        pytest.skip("the README's commands run in the checkout's .venv, which `make test` creates and uses")
    for name in LINKED:
        if name == "exports":
            (ROOT / name).mkdir(exist_ok=True)
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "readme.sh").write_text(script())
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(venv)))
    with open(tmp_path / "readme.log", "w+") as log:
        process = subprocess.Popen(["bash", "readme.sh"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
        try:
            code = process.wait(timeout=900)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # a server left running by a failed block
            except ProcessLookupError:
                pass
        log.seek(0)
        output = log.read()
    assert code == 0, output[-6000:]

    # make demo: both users answered, sharing forward passes.
    mixed = re.search(r"forward passes: (\d+) \(prefills included, one per request\), of which (\d+) carried "
                      r"both users' rows", output)
    assert mixed and int(mixed.group(2)) > 0, output[-6000:]
    # The quickstart made a prefix, generated with it and scored it.
    assert (tmp_path / "my-e2e.npz").exists()
    generated = [json.loads(line) for line in output.splitlines() if line.startswith('{"input": "name : Aromi')]
    assert generated and generated[0]["prefix"] == "my-e2e" and generated[0]["text"].strip()
    scores = json.loads((tmp_path / "results" / "my-e2e" / "scores.json").read_text())
    assert scores["inputs"] == 10 and 0 < scores["scores"]["BLEU"] <= 1
    # The server answered curl and the OpenAI client with both prefixes, and the key rules held.
    assert '"object":"text_completion"' in output.replace(" ", "")
    assert re.search(r"^e2e\s+\S", output, flags=re.M) and re.search(r"^my-e2e\s+\S", output, flags=re.M)
    assert re.search(r"^403$", output, flags=re.M)
    # The Python API block printed three rows: two prefixes and the bare backbone.
    assert re.search(r"^restaurants ['\"]", output, flags=re.M) and re.search(r"^None ['\"]", output, flags=re.M)
    # The short load benchmark and the data-parallel training ran.
    load = json.loads((tmp_path / "bench-load.json").read_text())
    assert load["runs"][0]["errors"] == 0 and load["runs"][0]["requests"] > 0
    assert (tmp_path / "dp.npz").exists()
    shutil.rmtree(tmp_path / "results", ignore_errors=True)
