"""Regenerate docs/label.png: the `rlhf label` screen, drawn by the labeller's own `screen()`.

    python scripts/label_screenshot.py                  # -> docs/label.png
    python scripts/label_screenshot.py --out /tmp/label.png --svg /tmp/label.svg

rich records the screen and writes it as SVG (`Console(record=True)`, `save_svg`); the SVG is turned
into a PNG by `rsvg-convert` (Debian/Ubuntu: apt-get install librsvg2-bin) or, failing that, by a
real ImageMagick `magick`/`convert` (the text is drawn with the local monospace font, DejaVu Sans
Mono on Debian). Nothing is downloaded and no model is loaded: the item is a demo question with two
replies of the kind the demo's SFT model writes.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from rlhf_cli.labeling.items import Item, item_id
from rlhf_cli.labeling.terminal import screen

REPO = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": 'What is 42 + 37? Reply in the form "Answer: <answer>".'}]
REPLIES = (
    "Answer: 79",
    "Answer: 79. 42 + 37 = 79, because 40 + 30 = 70 and 2 + 7 = 9. Hope this helps!",
)


def render_svg(path: Path, width: int) -> None:
    """The labeller's screen for one demo item (item 18 of 40, the verbose reply on the left)."""
    item = Item(id=item_id(PROMPT, *REPLIES), prompt=PROMPT, responses=REPLIES, candidates=(0, 1),
                sources=("a", "a"), columns={}, row_id=17)  # fmt: skip
    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor")  # fmt: skip
    console.print(screen(item, (1, 0), done=17, total=40, skipped=2, labeler="alice",
                         out=Path("prefs.jsonl")))  # fmt: skip
    svg = console.export_svg(
        title="rlhf label in=pairs.jsonl out=prefs.jsonl labeler=alice",
        font_aspect_ratio=0.602,  # DejaVu Sans Mono's advance: the converters ignore textLength
    )
    # keep runs of spaces (rsvg would collapse them, gluing "rlhf label" to "item 18")
    path.write_text(svg.replace("<svg ", '<svg xml:space="preserve" ', 1), encoding="utf-8")


def converter() -> list[str]:
    """The command that turns an SVG into a PNG here (rsvg-convert, or a real ImageMagick)."""
    if shutil.which("rsvg-convert"):
        return ["rsvg-convert", "--zoom", "1.5", "--format", "png", "--output"]
    for name in ("magick", "convert"):
        tool = shutil.which(name)
        probe = subprocess.run([tool, "-version"], capture_output=True, text=True) if tool else None
        if probe is not None and "ImageMagick" in probe.stdout:
            return [tool, "-density", "144", "svg:{svg}", "png:{png}"]
    sys.exit(
        "no SVG converter found: install librsvg2-bin (apt-get install librsvg2-bin), or ImageMagick."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "label.png")
    parser.add_argument("--svg", type=Path, help="also keep the SVG here")
    parser.add_argument("--width", type=int, default=100, help="terminal columns")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        svg = args.svg or Path(tmp) / "label.svg"
        render_svg(svg, args.width)
        command = converter()
        if "{svg}" in " ".join(command):
            command = [part.format(svg=svg, png=args.out) for part in command]
        else:
            command = [*command, str(args.out), str(svg)]
        subprocess.run(command, check=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
