"""Plain-text tables in the style operators know from calicoctl."""

from __future__ import annotations

from collections.abc import Sequence


def render(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(row: list[str]) -> str:
        return "|" + "|".join(f" {c.center(w)} " for c, w in zip(row, widths, strict=True)) + "|"

    out = [rule, line(cells[0]), rule]
    out += [line(r) for r in cells[1:]]
    out.append(rule)
    return "\n".join(out)
