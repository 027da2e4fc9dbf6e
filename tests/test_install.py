"""The locked package set: constraints.txt pins what changes the numbers, make install applies it,
and the version checks run without importing a model library."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _locked() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_the_lock_pins_every_package_that_changes_numbers_and_make_install_applies_it():
    pins = _locked()
    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "tokenizers",
                 "safetensors", "trl", "hydra-core", "omegaconf", "datasets", "tensorboard"):  # fmt: skip
        assert name in pins, name
    assert "torch" not in pins  # pinned by the Makefile: a CUDA machine keeps its own build
    makefile = (REPO / "Makefile").read_text()
    assert "TORCH_CPU := torch==2.13.0" in makefile
    installs = [line for line in makefile.splitlines() if "$(PIP) install" in line and "-e" in line]
    assert installs and all("-c $(CONSTRAINTS)" in line for line in installs)


def test_the_versions_that_matter_are_shown_without_importing_them():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "rlhf_cli", "--version"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0 and result.stdout.startswith("rlhf-cli ")
    assert re.search(r"transformers \d", result.stdout) and "make versions" in result.stdout
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line
    }
    assert not {"torch", "transformers", "peft"} & imported
    report = subprocess.run([sys.executable, str(REPO / "scripts" / "versions.py")],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert report.returncode == 0 and report.stdout.startswith("torch ")
    assert "locked set" in report.stdout.splitlines()[-1]


def test_make_lock_rewrites_the_readme_table_and_the_versions_it_names(tmp_path, monkeypatch):
    """scripts/lock.py's last step, on a copy of the README: the demo table's code block is
    replaced, the sentence naming the locked torch/transformers/peft is rewritten with the
    interpreter's versions, and nothing else changes."""
    from importlib.metadata import version

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import lock

    readme = tmp_path / "README.md"
    current = f"(torch {version('torch')},\ntransformers {version('transformers')}, peft {version('peft')};"
    stale = "(torch 0.0.1,\ntransformers 0.0.2, peft 0.0.3;"  # as if the lock had moved
    original = (REPO / "README.md").read_text()
    named = re.search(r"\(torch \S+,\ntransformers \S+, peft \S+;", original).group()
    readme.write_text(original.replace(named, stale))
    monkeypatch.setattr(lock, "README", readme)
    lock.update_readme("the new table\n", Path(sys.executable))
    text = readme.read_text()
    start = text.index("It ends with this table:")
    assert text[start:].startswith("It ends with this table:\n\n```\nthe new table\n```\n")
    assert current in text and stale not in text
    # everything before the table and after the versions' sentence is as it was
    assert text[:start] == original[:start]
    tail = original.index("; every `final/rlhf_stage.json`")
    assert text.endswith(original[tail:])
