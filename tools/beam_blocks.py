"""Draws the block tables of 4 beams over 10 rounds of a real beam search, for the book's decoding page.

    python tools/beam_blocks.py          # writes book/beam_blocks.svg and book/beam_blocks.txt
    python tools/beam_blocks.py --check  # fail if either differs from what a run gives now (CI)

The run: tiny-llama (tests/models), blocks of 4 tokens, a 10-token prompt, beam width 4, prefix caching off so
every sharing comes from forks. After each step, each live beam's block table is read from the engine, with each
block's reference count: a block with a count above 1 is shared by that many beams.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = [1, 17, 45, 88, 203, 9, 311, 42, 7, 150]
WIDTH, ROUNDS, BLOCK = 4, 10, 4
OUT = ROOT / "book" / "beam_blocks"


def block_tables() -> list[list[list[tuple[int, int]]]]:
    """For each round 1..ROUNDS, for each beam, its block table as (block id, reference count) pairs."""
    from nanovllm import LLM
    from nanovllm.engine.beam_search import BeamSearch, BeamSearchParams, update_searches

    llm = LLM(str(ROOT / "tests" / "models" / "tiny-llama"), block_size=BLOCK, enable_prefix_caching=False)
    search = BeamSearch(llm, PROMPT, BeamSearchParams(WIDTH, ROUNDS + 2))
    rounds = []
    while len(rounds) < ROUNDS:
        update_searches([search])
        llm.step()
        if len(search.request_ids) == WIDTH:  # from the second step on: the forks exist
            seqs = [llm.requests[r] for r in search.request_ids]
            rounds.append([[(b, llm.block_manager.blocks[b].ref_count) for b in s.block_table] for s in seqs])
    search.abort()
    return rounds


def render_text(rounds) -> str:
    lines = [
        f"tiny-llama, blocks of {BLOCK} tokens, a {len(PROMPT)}-token prompt, beam width {WIDTH}.",
        "Each beam's block table after each step; a block shared by n beams is written id*n.",
        "",
        "step | " + " | ".join(f"beam {i}".ljust(20) for i in range(WIDTH)),
        "-----+-" + "-+-".join("-" * 20 for _ in range(WIDTH)),
    ]
    for step, tables in enumerate(rounds, 1):
        cells = [" ".join(f"{b}*{n}" if n > 1 else str(b) for b, n in table).ljust(20) for table in tables]
        lines.append(f"{step:>4} | " + " | ".join(cells))
    return "\n".join(line.rstrip() for line in lines) + "\n"


def render_svg(rounds) -> str:
    """One row per step, the beams' tables side by side; the darker a block, the more beams share it."""
    cell, gap, left, top = 26, 30, 60, 40
    most = max(len(t) for tables in rounds for t in tables)
    beam_w = most * cell + gap
    width, height = left + WIDTH * beam_w, top + len(rounds) * (cell + 8) + 40
    shades = {1: "#e8eef7", 2: "#9ab8e0", 3: "#4f83c4", 4: "#1d4f91"}
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" '
        'font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    for i in range(WIDTH):
        parts.append(f'<text x="{left + i * beam_w}" y="{top - 12}" font-size="13">beam {i}</text>')
    for step, tables in enumerate(rounds):
        y = top + step * (cell + 8)
        parts.append(f'<text x="8" y="{y + cell * 0.65:.0f}">step {step + 1}</text>')
        for i, table in enumerate(tables):
            for j, (block, refs) in enumerate(table):
                x = left + i * beam_w + j * cell
                fill, ink = shades[min(refs, 4)], "white" if refs > 2 else "black"
                parts.append(f'<rect x="{x}" y="{y}" width="{cell - 2}" height="{cell}" fill="{fill}" stroke="#555"/>')
                parts.append(f'<text x="{x + 3}" y="{y + cell * 0.65:.0f}" fill="{ink}">{block}</text>')
    legend_y = top + len(rounds) * (cell + 8) + 16
    for n, shade in shades.items():
        x = left + (n - 1) * 150
        parts.append(f'<rect x="{x}" y="{legend_y - 11}" width="14" height="14" fill="{shade}" stroke="#555"/>')
        parts.append(f'<text x="{x + 20}" y="{legend_y}">{"own block" if n == 1 else f"shared by {n}"}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the stored files differ from a run now")
    args = parser.parse_args()
    rounds = block_tables()
    files = {OUT.with_suffix(".txt"): render_text(rounds), OUT.with_suffix(".svg"): render_svg(rounds)}
    if args.check:
        stale = [str(p) for p, text in files.items() if not p.exists() or p.read_text() != text]
        if stale:
            print(f"stale (run python tools/beam_blocks.py): {stale}")
            return 1
        return 0
    for path, text in files.items():
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
