"""`qcc analyze FLOAT.onnx QUANT.onnx --data DIR`: which layers lose accuracy, and whether weights or
activations are to blame (compiler.layer_analysis); a terminal table of the worst, JSON, a
self-contained HTML report, and ``--fail-under`` as a CI gate on the final outputs."""
from __future__ import annotations

import html
import json
import math
import sys
from pathlib import Path

from compiler.arguments import add_image_arguments, add_input_shape, image_options, input_shapes, parse_gate
from compiler.ir import QccError, load
from compiler.outputs import write_file
from compiler.layer_analysis import Analysis, analyze

EXIT_GATE_FAILED = 1
# Layer columns shown in the HTML table, in order, with their JSON key and number format.
COLUMNS = [
    ("index", "depth", "d"), ("name", "tensor", "s"), ("op", "op", "s"), ("then", "compared after", "s"),
    ("bits", "bits", "d"),
    ("enc_min", "enc min", "g"), ("enc_max", "enc max", "g"), ("fp32_min", "fp32 min", "g"), ("fp32_max", "fp32 max", "g"),
    ("cos", "cos", ".6f"), ("cos_min", "cos min", ".6f"), ("sqnr", "SQNR dB", "dB"),
    ("local_cos", "local cos", ".6f"), ("local_sqnr", "local SQNR dB", "dB"),
    ("weights_sqnr", "weights-only SQNR dB", "dB"), ("activations_sqnr", "activations-only SQNR dB", "dB"),
    ("blame", "blame", "s"), ("weight_bits", "weight bits", "d"), ("weight_per_channel", "per-channel", "s"),
]


def add_command(sub) -> None:
    p = sub.add_parser("analyze", help="per-layer accuracy of a QDQ model against its float model")
    p.add_argument("float_model", metavar="FLOAT.onnx")
    p.add_argument("quant_model", metavar="QUANT.onnx")
    p.add_argument("--data", required=True, metavar="DIR", help="folder of samples (.npy, .npz or images)")
    p.add_argument("--count", type=int, default=8, help="number of samples to use (default 8)")
    add_image_arguments(p)
    add_input_shape(p)
    p.add_argument("--top", type=int, default=10, help="rows in the table of worst layers (default 10)")
    p.add_argument("--json", metavar="OUT.json", help="write every layer's numbers as JSON")
    p.add_argument("--html", metavar="OUT.html", help="write a self-contained HTML report")
    p.add_argument("--fail-under", action="append", metavar="cos=0.999|sqnr=30",
                   help="exit 1 when a final output's mean cosine or SQNR (dB) is below the bar (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no table, only the gate result")
    p.set_defaults(func=cmd_analyze)


def gate_failures(analysis: Analysis, gate: dict) -> list[str]:
    failures = []
    for out in analysis.outputs:
        sqnr = math.inf if out.sqnr is None else out.sqnr
        if "cos" in gate and out.cos < gate["cos"]:
            failures.append(f"output '{out.name}': cosine {out.cos:.6f} < {gate['cos']:g}")
        if "sqnr" in gate and sqnr < gate["sqnr"]:
            failures.append(f"output '{out.name}': SQNR {sqnr:.2f} dB < {gate['sqnr']:g} dB")
    return failures


def _load_models(args):
    shapes = input_shapes(args.input_shape)
    float_module = load(args.float_model, shapes)
    quant_module = load(args.quant_model, shapes)
    return float_module, quant_module


def cmd_analyze(args) -> int:
    from compiler.data import Dataset, specs_of
    gate = parse_gate(args.fail_under)
    if args.top <= 0:
        raise QccError(f"--top must be positive, got {args.top}")
    for out in (args.json, args.html):
        if out and not Path(out).resolve().parent.is_dir():
            raise QccError(f"{out}: output folder '{Path(out).parent}' does not exist")
    float_module, quant_module = _load_models(args)
    data = Dataset(args.data, specs_of(float_module), count=args.count, image=image_options(args))
    analysis = analyze(float_module.to_onnx(), quant_module.to_onnx(), data)
    report = report_dict(analysis, args, gate)
    if args.json:
        write_file(Path(args.json), json.dumps(report, indent=1) + "\n")
    if args.html:
        write_file(Path(args.html), render_html(report))
    if not args.quiet:
        sys.stdout.write(render_text(report, args.top))
    for failure in report["gate"]["failures"]:
        print(f"qcc analyze: FAIL {failure}", file=sys.stderr)
    return EXIT_GATE_FAILED if report["gate"]["failures"] else 0


def report_dict(analysis: Analysis, args, gate: dict) -> dict:
    report = {"float_model": Path(args.float_model).name, "quant_model": Path(args.quant_model).name}
    report.update(analysis.to_dict())
    report["worst"] = [r.name for r in analysis.worst(args.top)]
    report["gate"] = {"bars": gate, "failures": gate_failures(analysis, gate)}
    return report


# --- Rendering ---------------------------------------------------------------------------------

def fmt(value, spec: str) -> str:
    """One cell. spec "dB": an SQNR with 2 decimals, None meaning no error at all (infinite SQNR)."""
    if spec == "dB":
        return "inf" if value is None else format(value, ".2f")
    if value is None:
        return "-"
    if isinstance(value, bool) or spec == "s":
        return str(value)
    if spec == "d":
        return str(int(value))
    return format(value, spec)


def _op(row: dict) -> str:
    """The producer, and the activation the tensor is compared after: Add>HardSwish."""
    return f"{row['op']}>{row['then']}" if row["then"] else row["op"]


def _db(value) -> str:
    return "inf" if value is None else f"{value:.1f}"


def _weights_db(row: dict, formatter) -> str:
    # No weights-only measure where FLOAT's weights are not the ones QUANT quantized (blame "unknown").
    return "?" if row["blame"] == "unknown" else formatter(row["weights_sqnr"])


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def render_text(report: dict, top: int) -> str:
    lines = [f"{report['quant_model']} vs {report['float_model']}: {report['samples']} samples, "
             f"{len(report['layers'])} quantized tensors, {report['seconds']:.1f}s"]
    for out in report["outputs"]:
        lines.append(f"output {out['name']}: cos {fmt(out['cos'], '.6f')} (min {fmt(out['cos_min'], '.6f')}) "
                     f"SQNR {fmt(out['sqnr'], 'dB')} dB | weights only: cos {fmt(out['weights_only_cos'], '.6f')} "
                     f"| activations only: cos {fmt(out['activations_only_cos'], '.6f')}")
    by_name = {row["name"]: row for row in report["layers"]}
    header = f"{'#':>3} {'depth':>5} {'tensor':<40} {'op':<16} {'bits':>4} {'encoding':>21} {'fp32 range':>21} " \
             f"{'cos':>8} {'SQNR':>6} {'local cos':>9} {'local':>6} {'w':>6} {'a':>6}  blame"
    lines += ["", f"worst {min(top, len(report['worst']))} layers by local SQNR (dB; w/a: weights/activations only, local)",
              header]
    for rank, name in enumerate(report["worst"], 1):
        r = by_name[name]
        lines.append(f"{rank:>3} {r['index']:>5} {_short(r['name'], 40):<40} {_op(r)[:16]:<16} {r['bits']:>4} "
                     f"{'[' + fmt(r['enc_min'], '.4g') + ', ' + fmt(r['enc_max'], '.4g') + ']':>21} "
                     f"{'[' + fmt(r['fp32_min'], '.4g') + ', ' + fmt(r['fp32_max'], '.4g') + ']':>21} "
                     f"{fmt(r['cos'], '.5f'):>8} {_db(r['sqnr']):>6} {fmt(r['local_cos'], '.6f'):>9} "
                     f"{_db(r['local_sqnr']):>6} {_weights_db(r, _db):>6} {_db(r['activations_sqnr']):>6}  {r['blame']}")
    if report["fused"]:
        lines += ["", f"{len(report['fused'])} quantized tensors feed only a Relu/Clip (fused on HTP): compared after it"]
    if report["unmatched"]:
        lines += [f"{len(report['unmatched'])} DequantizeLinear outputs not compared (first: {report['unmatched'][0]}); "
                  f"compare against the float model insert-qdq quantized (qcc compile writes it as OUT.float.onnx)"]
    for failure in report["gate"]["failures"]:
        lines.append(f"FAIL {failure}")
    if report["gate"]["bars"] and not report["gate"]["failures"]:
        lines.append("gate passed: " + ", ".join(f"{k} >= {v:g}" for k, v in report["gate"]["bars"].items()))
    return "\n".join(lines) + "\n"


PLOT_WIDTH, PLOT_HEIGHT, MARGIN = 960, 220, 48


def _svg_panel(rows: list[dict], series: list[tuple[str, str, str]], title: str, worst: set) -> str:
    """One line chart over depth (row position): series = (JSON key, label, colour)."""
    values = [r[key] for r in rows for key, _, _ in series if r[key] is not None]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    n = max(len(rows) - 1, 1)
    w, h = PLOT_WIDTH - 2 * MARGIN, PLOT_HEIGHT - 2 * MARGIN

    def xy(i, v):
        return MARGIN + w * i / n, MARGIN + h * (hi - v) / (hi - lo)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{PLOT_WIDTH}" height="{PLOT_HEIGHT}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<rect x="0" y="0" width="{PLOT_WIDTH}" height="{PLOT_HEIGHT}" fill="#ffffff"/>',
             f'<text x="{MARGIN}" y="20" font-size="14" font-weight="bold">{html.escape(title)}</text>',
             f'<rect x="{MARGIN}" y="{MARGIN}" width="{w}" height="{h}" fill="#f7f7f7" stroke="#999"/>']
    for frac in (0.0, 0.5, 1.0):
        value = hi - frac * (hi - lo)
        y = MARGIN + frac * h
        parts.append(f'<text x="{MARGIN - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{value:.4g}</text>')
    parts.append(f'<text x="{MARGIN + w / 2}" y="{PLOT_HEIGHT - 8}" font-size="11" text-anchor="middle">'
                 f'quantized tensors in topological order (depth)</text>')
    for k, (key, label, colour) in enumerate(series):
        points = [xy(i, r[key]) for i, r in enumerate(rows) if r[key] is not None]
        if points:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        parts.append(f'<rect x="{MARGIN + 10 + 190 * k}" y="28" width="12" height="4" fill="{colour}"/>'
                     f'<text x="{MARGIN + 26 + 190 * k}" y="34" font-size="11">{html.escape(label)}</text>')
    key = series[-1][0]
    for i, r in enumerate(rows):
        if r["name"] in worst and r[key] is not None:
            x, y = xy(i, r[key])
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="none" stroke="#d00" stroke-width="2">'
                         f'<title>{html.escape(r["name"])} ({html.escape(r["op"])}): {key} {r[key]:.4g}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: list[dict], table_id: str, worst: set) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in COLUMNS)
    body = []
    for r in rows:
        cls = ' class="worst"' if r["name"] in worst else ""
        cells = "".join(f'<td data-key="{key}">{html.escape(_weights_db(r, lambda v: fmt(v, spec)) if key == "weights_sqnr" else fmt(r[key], spec))}</td>'
                        for key, _, spec in COLUMNS)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def render_html(report: dict) -> str:
    rows = report["layers"]
    worst = set(report["worst"])
    by_name = {r["name"]: r for r in rows}
    outputs = "".join(
        f"<li><b>{html.escape(o['name'])}</b>: cosine {fmt(o['cos'], '.6f')} (min {fmt(o['cos_min'], '.6f')}), "
        f"SQNR {fmt(o['sqnr'], 'dB')} dB; weights only: cosine {fmt(o['weights_only_cos'], '.6f')}, "
        f"SQNR {fmt(o['weights_only_sqnr'], 'dB')} dB; activations only: cosine {fmt(o['activations_only_cos'], '.6f')}, "
        f"SQNR {fmt(o['activations_only_sqnr'], 'dB')} dB</li>" for o in report["outputs"])
    gate = "".join(f"<p class='fail'>FAIL {html.escape(f)}</p>" for f in report["gate"]["failures"])
    sqnr = _svg_panel(rows, [("sqnr", "accumulated SQNR (dB)", "#1f77b4"), ("local_sqnr", "local SQNR (dB)", "#ff7f0e")],
                      "SQNR along depth", worst)
    cos = _svg_panel(rows, [("cos", "accumulated cosine", "#1f77b4"), ("local_cos", "local cosine", "#ff7f0e")],
                     "Cosine along depth", worst)
    title = f"qcc analyze: {report['quant_model']} vs {report['float_model']}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; color: #222; background: #fff; }}
table {{ border-collapse: collapse; font-size: 12px; margin-bottom: 24px; }}
th, td {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
td[data-key="name"], td[data-key="op"], td[data-key="blame"] {{ text-align: left; }}
th {{ background: #eee; position: sticky; top: 0; }}
tr.worst td {{ background: #fde2e2; }}
.fail {{ color: #b00; font-weight: bold; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{report['samples']} samples, {len(rows)} quantized tensors, {report['seconds']:.1f} s. Local: the layer on FP32 inputs
(only its own weights and output quantizer err); accumulated: everything upstream quantized. Blame splits the local
error into weights-only and activations-only noise.</p>
<ul>{outputs}</ul>{gate}
{sqnr}
{cos}
<h2>Worst {len(report['worst'])} layers (lowest local SQNR)</h2>
{_table([by_name[n] for n in report['worst']], "worst", worst)}
<h2>All quantized tensors</h2>
{_table(rows, "layers", worst)}
</body></html>
"""
