"""The benchmark's table and its last line of ratios."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Figure:
    name: str
    unit: str
    baseline: float | None
    sidecar: float
    ratio: float | None
    target: str
    passed: bool | None
    higher_is_better: bool = True

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


def render(figures: list[Figure], machine: str, mode: str, seconds: float, store: str = "SQLite full") -> str:
    rows = [("figure", "unit", "baseline", "sidecar", "ratio", "target", "")]
    for f in figures:
        verdict = "" if f.passed is None else ("PASS" if f.passed else "MISS")
        if f.ratio is None or f.baseline is None:
            ratio = "-"  # an absolute figure (no baseline): the target applies to the value itself
        else:
            ratio = f"{f.ratio:.2f}" if f.higher_is_better else f"{f.ratio:.2f}x"
        rows.append((f.name, f.unit, _num(f.baseline), _num(f.sidecar), ratio, f.target, verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"sidecar benchmark ({mode}, {seconds:.0f} s, store: {store}) on {machine}", ""]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    short = {
        "gRPC ingest": "grpc_ingest",
        "HTTP ingest": "http_ingest",
        "e2e latency p50": "e2e_p50",
        "RSS per idle stream": "stream_rss_kib",
        "webhook delivery": "webhook",
    }
    ratios = []
    for f in figures:
        for prefix, key in short.items():
            if not f.name.startswith(prefix):
                continue
            if key == "stream_rss_kib":  # its target is absolute
                ratios.append(f"{key}={f.sidecar:.2f}")
            elif f.ratio is not None:
                ratios.append(f"{key}={f.ratio:.2f}" + ("x" if key == "e2e_p50" else ""))
    lines += ["", "ratios: " + " ".join(ratios)]
    return "\n".join(lines)
