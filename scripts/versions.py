"""Which package set is installed, against the locked one (constraints.txt): `make versions`.

Prints the versions that change the demo's numbers and every package whose installed version
differs from the lock; exits 0 either way (a different set still works: the demo then gives other
digits, in the same order).
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
THAT_MATTER = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers",
               "safetensors", "trl")  # fmt: skip


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main() -> None:
    locked = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            locked[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    locked["torch"] = "2.13.0"  # the Makefile's pin (on a machine without CUDA)
    for name in THAT_MATTER:
        have, want = installed(name), locked.get(name)
        mark = "" if have and want and have.split("+")[0] == want else f"   (locked: {want})"
        print(f"{name:<14} {have or 'not installed'}{mark}")
    differ = [(n, installed(n), v) for n, v in sorted(locked.items())
              if n not in THAT_MATTER and installed(n) not in (v, None)]  # fmt: skip
    for name, have, want in differ:
        print(f"{name:<14} {have}   (locked: {want})")
    same = not differ and all(
        (installed(n) or "").split("+")[0] == locked.get(n) for n in THAT_MATTER if n in locked
    )
    print("the locked set: the README's demo table applies to the last digit" if same else
          "not the locked set: `make install` installs it; other versions may round floats differently, "
          "and the demo table then differs in its digits")  # fmt: skip


if __name__ == "__main__":
    main()
