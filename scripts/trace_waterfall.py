#!/usr/bin/env python3
"""Draws one trace as a waterfall (SVG): a row per span, indented under its parent, a bar from
its start to its end, coloured by the process that sent it.

Input: the JSON list of spans the OTLP test dumps when TANDEM_TRACE_DUMP names a file
(services/tandem/tests/cluster_otlp.rs), each with service, name, span_id, parent_span_id,
start_ns, end_ns and attributes.

    TANDEM_TRACE_DUMP=/tmp/trace.json cargo test -p tandem --test cluster_otlp one_streamed
    scripts/trace_waterfall.py /tmp/trace.json docs/images/trace_waterfall.svg
"""

import json
import sys
from html import escape

COLOURS = {
    "tandem-gateway": "#4e79a7",
    "tandem-prefill": "#f28e2b",
    "tandem-decode": "#59a14f",
    "tandem-kv-store": "#b07aa1",
}

# The attributes worth a word beside a bar, when a span has them.
NOTES = [
    ("gen_ai.usage.input_tokens", "in {} tok"),
    ("gen_ai.usage.output_tokens", "out {} tok"),
    ("tandem.prefill.computed_tokens", "{} computed"),
    ("tandem.prefill.cached_tokens", "{} cached"),
    ("tandem.kv.transport", "{}"),
    ("tandem.kv.bytes", "{} B"),
    ("tandem.kv.gbps", "{:.2f} GB/s"),
    ("tandem.route.prefix_overlap_blocks", "overlap {} blocks"),
    ("tandem.decode.first_token_ms", "first token {:.1f} ms"),
]


def order(spans):
    """Depth-first, children by start time: the order Jaeger shows."""
    ids = {s["span_id"] for s in spans}
    children = {}
    for s in spans:
        parent = s["parent_span_id"] if s["parent_span_id"] in ids else ""
        children.setdefault(parent, []).append(s)
    out = []

    def walk(parent, depth):
        for s in sorted(children.get(parent, []), key=lambda s: (s["start_ns"], -s["end_ns"])):
            out.append((s, depth))
            walk(s["span_id"], depth + 1)

    walk("", 0)
    return out


def note(span):
    parts = []
    for key, fmt in NOTES:
        v = span.get("attributes", {}).get(key)
        if v is not None:
            try:
                parts.append(fmt.format(v))
            except (ValueError, TypeError):
                parts.append(str(v))
    return ", ".join(parts)


def render(spans):
    rows = order(spans)
    t0 = min(s["start_ns"] for s in spans)
    t1 = max(s["end_ns"] for s in spans)
    total = max(t1 - t0, 1)
    label_w, bar_w, row_h, top = 330, 640, 22, 46
    width = label_w + bar_w + 20
    height = top + row_h * len(rows) + 40
    ms = total / 1e6
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="20" font-size="14" font-weight="bold">One streamed chat request: {len(rows)} spans from '
        f'{len({s["service"] for s in spans})} processes, {ms:.1f} ms</text>',
    ]
    # A tick every round number of milliseconds.
    step = next(s for s in [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000] if ms / s <= 10)
    t = 0
    while t <= ms:
        x = label_w + bar_w * t / ms
        out.append(f'<line x1="{x:.1f}" y1="{top - 8}" x2="{x:.1f}" y2="{height - 30}" stroke="#ddd"/>')
        out.append(f'<text x="{x:.1f}" y="{top - 12}" text-anchor="middle" fill="#666">{t} ms</text>')
        t += step
    for i, (s, depth) in enumerate(rows):
        y = top + i * row_h
        colour = COLOURS.get(s["service"], "#999")
        x = label_w + bar_w * (s["start_ns"] - t0) / total
        w = max(bar_w * (s["end_ns"] - s["start_ns"]) / total, 1.5)
        dur = (s["end_ns"] - s["start_ns"]) / 1e6
        out.append(f'<text x="{10 + depth * 12}" y="{y + 15}">{escape(s["name"])}</text>')
        out.append(f'<rect x="{x:.1f}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" fill="{colour}" rx="2"/>')
        label = f"{dur:.2f} ms"
        extra = note(s)
        if extra:
            label += f"  ({extra})"
        # Beside the bar where there is room, else inside it.
        tx, anchor, fill = x + w + 4, "start", "#333"
        if tx > label_w + bar_w - 230:
            if x - label_w > 230:
                tx, anchor = x - 4, "end"
            else:
                tx, fill = x + 4, "white"
        out.append(f'<text x="{tx:.1f}" y="{y + 15}" text-anchor="{anchor}" fill="{fill}">{escape(label)}</text>')
    ly = height - 14
    lx = 10
    for service, colour in COLOURS.items():
        if any(s["service"] == service for s in spans):
            out.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{colour}"/>')
            out.append(f'<text x="{lx + 16}" y="{ly}">{service}</text>')
            lx += 140
    out.append("</svg>")
    return "\n".join(out)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    spans = json.load(open(sys.argv[1]))
    with open(sys.argv[2], "w") as f:
        f.write(render(spans) + "\n")


if __name__ == "__main__":
    main()
