"""The monitoring dashboard: one self-contained HTML page, charts drawn server-side as SVG.

``render_dashboard(store, model, registry)`` reads the record store (5-minute rollups, the
monitor's stored detector results, the alert events) and, when given, the registry (alias moves)
and returns the page as a string: no script, no stylesheet or font from elsewhere, so it works on
a machine with no internet and can be saved as a file (``vaekit monitor dashboard -o FILE.html``),
served by ``vaekit monitor dashboard --port`` or by the service at ``/dashboard``.

Charts: recon error (per-pixel MSE: the bucket mean and its p99), KL and latent norm (bucket
means), requests and gate rejections per bucket, one line per version and route; drift p-values
per detector over time (log scale, the dashed line is alpha); the alert timeline (one bar per
episode, firing until resolved) and table; alias moves (also dotted vertical lines on the charts).
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from vaekit.errors import InputError, describe

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
W, H = 560, 220  # one chart's SVG size (px)
PAD_L, PAD_R, PAD_T, PAD_B = 64, 12, 24, 30
P_FLOOR = 1e-12  # p-values below this are drawn at it (a log axis down to 1e-300 would flatten the rest)


def _t(ts: float, with_date: bool = False) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M" if with_date else "%H:%M")


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    a = abs(v)
    return f"{v:.3g}" if a == 0 or 1e-3 <= a < 1e4 else f"{v:.2e}"


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


TIME_STEPS = (60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800)


def _time_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Ticks at round clock times (whole 5 / 15 / 30 minutes, hours, days) across [lo, hi]."""
    step = next((s for s in TIME_STEPS if (hi - lo) / s <= n), TIME_STEPS[-1])
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) // step) + 1)]


def line_chart(title: str, series: Sequence[tuple[str, Sequence[float], Sequence[float | None]]],
               x_range: tuple[float, float], *, log_y: bool = False, hline: float | None = None,
               markers: Sequence[tuple[float, str]] = (), unit: str = "") -> str:
    """An SVG line chart. ``series``: (label, times (Unix s), values; None breaks the line);
    ``log_y``: a log10 axis (values <= 0 or below P_FLOOR are drawn at P_FLOOR); ``hline``: a
    dashed reference line; ``markers``: (time, label) dotted vertical lines (alias moves)."""
    x0, x1 = x_range
    x1 = max(x1, x0 + 1)
    tf = (lambda v: math.log10(max(v, P_FLOOR))) if log_y else (lambda v: v)
    vals = [tf(v) for _, _, ys in series for v in ys if v is not None and math.isfinite(v)]
    if hline is not None:
        vals.append(tf(hline))
    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
           f'role="img" aria-label="{html.escape(title)}">',
           f'<text x="{PAD_L}" y="15" class="title">{html.escape(title)}</text>']
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    out.append(f'<rect x="{PAD_L}" y="{PAD_T}" width="{pw}" height="{ph}" class="plot"/>')
    if not vals:
        out.append(f'<text x="{PAD_L + pw / 2}" y="{PAD_T + ph / 2}" class="empty" text-anchor="middle">'
                   'no data in this period</text></svg>')
        return "".join(out)
    lo, hi = min(vals), max(vals)
    if log_y:
        lo, hi = math.floor(lo), max(0.0, math.ceil(hi))
    if hi - lo < 1e-12:
        lo, hi = lo - (abs(lo) * 0.1 or 1), hi + (abs(hi) * 0.1 or 1)
    elif not log_y:
        lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)

    def xpos(t: float) -> float:
        return PAD_L + (t - x0) / (x1 - x0) * pw

    def ypos(v: float) -> float:
        return PAD_T + (1 - (tf(v) - lo) / (hi - lo)) * ph

    yt = [10.0 ** e for e in range(int(lo), int(hi) + 1, max(1, int((hi - lo) / 4) or 1))] if log_y \
        else _ticks(lo, hi)
    for v in yt:
        y = ypos(v)
        label = f"1e{int(round(math.log10(v)))}" if log_y else _fmt(v)
        out.append(f'<line x1="{PAD_L}" x2="{PAD_L + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{PAD_L - 4}" y="{y + 4:.1f}" text-anchor="end" class="tick">{label}</text>')
    for t in _time_ticks(x0, x1, 6):
        x = xpos(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{PAD_T}" y2="{PAD_T + ph}" class="grid"/>'
                   f'<text x="{x:.1f}" y="{H - 12}" text-anchor="middle" class="tick">{_t(t)}</text>')
    if unit:
        out.append(f'<text x="12" y="{PAD_T + ph / 2}" class="tick" transform="rotate(-90 12 {PAD_T + ph / 2})" '
                   f'text-anchor="middle">{html.escape(unit)}</text>')
    if hline is not None:
        yh = ypos(hline)
        out.append(f'<line x1="{PAD_L}" x2="{PAD_L + pw}" y1="{yh:.1f}" y2="{yh:.1f}" class="hline"/>')
    for t, label in markers:
        if x0 <= t <= x1:
            out.append(f'<line x1="{xpos(t):.1f}" x2="{xpos(t):.1f}" y1="{PAD_T}" y2="{PAD_T + ph}" class="marker">'
                       f'<title>{html.escape(label)}</title></line>')
    for k, (label, xs, ys) in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        d, pen, points = [], "M", []
        for t, v in zip(xs, ys, strict=True):
            if v is None or not math.isfinite(v):
                pen = "M"
                continue
            d.append(f"{pen}{xpos(t):.1f},{ypos(v):.1f}")
            points.append((xpos(t), ypos(v), t, v))
            pen = "L"
        if d:
            out.append(f'<path class="series" data-series="{html.escape(label)}" d="{" ".join(d)}" '
                       f'stroke="{color}" fill="none"/>')
            if len(points) <= 60:  # dots (with a tooltip) while they do not crowd the line
                out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.2" fill="{color}"><title>{html.escape(label)} '
                        f'{_t(t, True)}: {_fmt(v)}</title></circle>' for x, y, t, v in points]
    out.append("</svg>")
    legend = "".join(f'<span class="key"><i style="background:{PALETTE[k % len(PALETTE)]}"></i>'
                     f'{html.escape(label)}</span>' for k, (label, _, _) in enumerate(series))
    return f'<figure>{"".join(out)}<figcaption>{legend}</figcaption></figure>'


def timeline(episodes: Sequence[dict[str, Any]], x_range: tuple[float, float]) -> str:
    """The alert timeline: one row per rule/version/route, a bar per episode (firing -> resolved or now)."""
    x0, x1 = x_range
    rows = sorted({e["key"] for e in episodes})
    if not rows:
        return '<p class="empty">no alerts in this period</p>'
    h = PAD_T + 22 * len(rows) + PAD_B
    lw = 230
    pw = 900 - lw - PAD_R
    out = [f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 900 {h}" width="900" '
           f'height="{h}" role="img" aria-label="alert timeline">']

    def xpos(t: float) -> float:
        return lw + (min(max(t, x0), x1) - x0) / max(x1 - x0, 1) * pw

    for t in _time_ticks(x0, x1, 8):
        out.append(f'<line x1="{xpos(t):.1f}" x2="{xpos(t):.1f}" y1="{PAD_T - 6}" y2="{h - PAD_B}" class="grid"/>'
                   f'<text x="{xpos(t):.1f}" y="{h - 12}" text-anchor="middle" class="tick">{_t(t)}</text>')
    for i, key in enumerate(rows):
        y = PAD_T + 22 * i
        out.append(f'<text x="{lw - 6}" y="{y + 13}" text-anchor="end" class="tick">{html.escape(key)}</text>')
        for e in (e for e in episodes if e["key"] == key):
            a, b = xpos(e["since"]), xpos(e["until"] if e["until"] is not None else x1)
            cls = "bar " + ("open" if e["until"] is None else "closed") + f" sev-{e['severity']}"
            out.append(f'<rect class="{cls}" x="{a:.1f}" y="{y + 2}" width="{max(b - a, 3):.1f}" height="15">'
                       f'<title>{html.escape(key)}: {_t(e["since"], True)} to '
                       f'{"now (firing)" if e["until"] is None else _t(e["until"], True)}</title></rect>')
    out.append("</svg>")
    return "".join(out)


def _ts(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def episodes_of(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Alert episodes (rule@version/route, since, until or None while firing, severity) from stored events."""
    open_: dict[str, dict[str, Any]] = {}
    done = []
    for e in events:
        key = f"{e['rule']}@{e['version']}/{e.get('route', 'production')}"
        if e["status"] == "firing":
            open_[key] = {"key": key, "since": _ts(e["at"]), "until": None, "severity": e.get("severity", "warning")}
        elif key in open_:
            ep = open_.pop(key)
            ep["until"] = _ts(e["at"])
            done.append(ep)
    return done + list(open_.values())


CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;margin-bottom:12px} .grid2{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:6px}
figcaption{font-size:12px;color:#444;padding:2px 6px} .key{margin-right:12px;white-space:nowrap}
.key i{display:inline-block;width:14px;height:3px;margin:0 5px 3px 0;vertical-align:middle}
svg .title{font-size:13px;font-weight:600;fill:#222} svg .tick{font-size:10px;fill:#666}
svg .plot{fill:#fff;stroke:#ccc} svg .grid{stroke:#eee} svg .series{stroke-width:1.8}
svg .hline{stroke:#d62728;stroke-dasharray:5 4} svg .marker{stroke:#555;stroke-dasharray:2 3}
svg .empty,p.empty{fill:#999;color:#999;font-style:italic}
svg .bar{fill:#f0ad4e} svg .bar.sev-critical{fill:#d9534f} svg .bar.sev-info{fill:#5bc0de}
svg .bar.open{stroke:#222;stroke-width:1}
table{border-collapse:collapse;background:#fff;font-size:13px} th,td{border:1px solid #e3e3e3;padding:3px 8px;
text-align:left} th{background:#f2f2f2} td.at{white-space:nowrap} tr.firing td.status{color:#c9302c;font-weight:600}
tr.resolved td.status{color:#3c763d} .badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;
background:#d9534f;margin-right:6px} .ok{background:#5cb85c}
"""


def render_dashboard(store: Any, model: str, registry: Any = None, *, hours: float = 24.0,
                     now: float | None = None, period_s: float = 300.0, alpha: float = 0.01) -> str:
    """The dashboard page (HTML) of ``model`` over the last ``hours`` hours (see the module docstring).

    ``store``: a RecordStore; ``registry``: a ModelRegistry for the alias moves (None: left out);
    ``now``: the end of the period (Unix s; default the current time); ``period_s``: the rollup
    bucket (5 minutes); ``alpha``: where the p-value charts draw their dashed line.
    """
    if not isinstance(model, str) or not model:
        raise InputError(f"model must be a non-empty model name, got {describe(model)}")
    if isinstance(hours, bool) or not isinstance(hours, int | float) or not 0 < hours <= 24 * 366:
        raise InputError(f"hours must be a number in (0, 8784], got {describe(hours)}")
    end = time.time() if now is None else float(now)
    start = end - hours * 3600
    span = (start, end)
    rollups = store.rollups(model, period_s, start, end)
    results = store.results(model, start, end)
    events = [e for e in store.alert_events(model, limit=10**9) if start <= _ts(e["at"]) <= end + period_s]
    moves = []
    if registry is not None:
        moves = [m for m in registry.history(model) if start <= _ts(m.at) <= end + period_s]
    markers = [(_ts(m.at), f"{m.name}@{m.alias}: {m.from_version} -> {m.to_version} ({m.reason})") for m in moves]

    groups = sorted({(r["version"], r["route"]) for r in rollups})
    def series(key: str) -> list[tuple[str, list[float], list[float | None]]]:
        out = []
        for v, route in groups:
            rs = [r for r in rollups if (r["version"], r["route"]) == (v, route)]
            out.append((f"v{v} {route}", [r["start"] + period_s / 2 for r in rs], [r[key] for r in rs]))
        return out

    charts = [
        line_chart("recon error, mean (per-pixel MSE)", series("recon_mse_mean"), span, markers=markers, unit="MSE"),
        line_chart("recon error, p99 (per-pixel MSE)", series("recon_mse_p99"), span, markers=markers, unit="MSE"),
        line_chart("KL, mean (nats)", series("kl_mean"), span, markers=markers, unit="nats"),
        line_chart("latent norm ||mu||, mean", series("latent_norm_mean"), span, markers=markers),
        line_chart(f"requests per {period_s / 60:g} min", series("n"), span, markers=markers),
        line_chart(f"gate rejections per {period_s / 60:g} min", series("rejected"), span, markers=markers),
    ]
    pcharts = []
    for v, route in sorted({(r["version"], r["route"]) for r in results}):
        rs = [r for r in results if (r["version"], r["route"]) == (v, route) and r["p_value"] is not None]
        dets = sorted({r["detector"] for r in rs})
        ser = [(d, [r["at"] for r in rs if r["detector"] == d], [r["p_value"] for r in rs if r["detector"] == d])
               for d in dets]
        pcharts.append(line_chart(f"drift p-values, v{v} {route} (log scale; dashed: alpha {alpha:g})", ser, span,
                                  log_y=True, hline=alpha, markers=markers, unit="p"))
    firing = [e for e in episodes_of(events) if e["until"] is None]
    total = sum(r["n"] for r in rollups)
    rejected = sum(r["rejected"] for r in rollups)
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>vaekit monitoring: {esc(model)}</title><meta name=\"viewport\" content=\"width=device-width\">",
        f"<style>{CSS}</style></head><body>",
        f"<h1>vaekit monitoring: {esc(model)}</h1>",
        f'<div class="meta">{_t(start, True)} to {_t(end, True)} UTC ({hours:g} h) &middot; {total} request(s), '
        f"{rejected} rejected by the gate &middot; {len(groups)} version/route(s) &middot; "
        f"{len(events)} alert event(s)</div>",
        '<div class="status">' + (
            "".join(f'<span class="badge firing-badge">{esc(e["key"])}</span>' for e in firing)
            if firing else '<span class="badge ok">no alert firing</span>') + "</div>",
        "<h2>Requests: reconstruction error, KL, latent norm</h2>", f'<div class="grid2">{"".join(charts)}</div>',
        "<h2>Drift p-values (what the monitor computed per window)</h2>",
        f'<div class="grid2">{"".join(pcharts)}</div>' if pcharts else
        '<p class="empty">no detector results stored yet (is <code>vaekit monitor run</code> running?)</p>',
        "<h2>Alert timeline</h2>", timeline(episodes_of(events), span),
        _alert_table(events),
        "<h2>Alias moves</h2>", _moves_table(moves, registry is not None),
        f'<p class="meta">generated {_t(time.time(), True)} UTC by vaekit; charts are server-side SVG; '
        "dotted vertical lines mark alias moves.</p></body></html>",
    ]
    return "\n".join(parts)


def _short_time(iso_time: str) -> str:
    """'2026-12-01T10:12:44.254Z' -> '2026-12-01 10:12:44' (UTC, as the page says)."""
    return iso_time[:19].replace("T", " ")


def _alert_table(events: Sequence[dict[str, Any]]) -> str:
    if not events:
        return ""
    esc = html.escape
    rows = "".join(
        f'<tr class="alert {esc(e["status"])}"><td class="at">{esc(_short_time(e["at"]))}</td>'
        f'<td class="status">{esc(e["status"])}</td>'
        f'<td>{esc(e["rule"])}</td><td>{esc(str(e["version"]))}</td><td>{esc(str(e.get("route", "")))}</td>'
        f'<td>{esc(e.get("severity", ""))}</td><td>{_fmt(e.get("value"))}</td><td>{_fmt(e.get("p_value"))}</td>'
        f'<td>{_fmt(e.get("threshold"))}</td><td>{esc(e.get("message", ""))}</td></tr>'
        for e in reversed(events[-200:]))
    return ('<h2>Alert events (newest first)</h2><table id="alerts"><thead><tr><th>at</th><th>status</th>'
            "<th>rule</th><th>version</th><th>route</th><th>severity</th><th>value</th><th>p</th><th>threshold</th>"
            f"<th>message</th></tr></thead><tbody>{rows}</tbody></table>")


def _moves_table(moves: Sequence[Any], have_registry: bool) -> str:
    if not have_registry:
        return '<p class="empty">no registry given</p>'
    if not moves:
        return '<p class="empty">no alias moves in this period</p>'
    esc = html.escape
    rows = "".join(f'<tr><td class="at">{esc(_short_time(m.at))}</td><td>{esc(m.alias)}</td><td>{esc(m.action)}</td>'
                   f"<td>{m.from_version if m.from_version is not None else '-'}</td><td>{m.to_version}</td>"
                   f"<td>{esc(m.actor)}</td><td>{esc(m.reason)}</td></tr>" for m in reversed(moves))
    return ('<table id="moves"><thead><tr><th>at</th><th>alias</th><th>action</th><th>from</th><th>to</th>'
            f"<th>by</th><th>reason</th></tr></thead><tbody>{rows}</tbody></table>")
