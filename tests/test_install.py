"""The locked package set: constraints.txt pins what changes the numbers, make install applies it,
and the version checks run without importing a model library."""

import re
import subprocess
import sys

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
