#!/usr/bin/env python3
"""Offline picture of the Grafana dashboard, from real scrapes of /metrics.

    render.py collect --url http://127.0.0.1:8585 --seconds 60 --out scrapes.jsonl
    render.py traffic --synapse URL --service URL --seconds 75
    render.py render  --scrapes scrapes.jsonl --out docs/dashboard.png
    render.py demo    --bin target/release/synapse-keys-worker --png docs/dashboard.png

`collect` scrapes `/metrics` once a second into JSON lines
(`{"t": unix_seconds, "text": "<metrics text>", "instance": "host:port"}`).
`traffic` drives a bounded, loopback-only /keys/query load at the service
(users and keys are created on Synapse through its client API first).
`render` reads the panel layout (titles, gridPos, units, legends, colours,
thresholds) from the dashboard JSON, computes each panel's series from the
scrapes with the small PromQL-like mapping in PANELS below (keyed by panel
title), and draws a Grafana-like dark PNG. `demo` runs inside the project's
test stack (`SKW_TEST_CMD=... bash scripts/test.sh`): it starts the service,
collects while `traffic` runs, and renders.

`collect` and `traffic` need only the Python standard library; `render`
needs matplotlib (see contrib/grafana/README.md).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import math
import os
import random
import re
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DASHBOARD = os.path.join(HERE, "synapse-keys-worker.json")
PREFIX = "synapse_keys_worker_"
NAN = float("nan")
INF = float("inf")


# ------------------------------------------------------------------ parsing --
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _unescape(v: str) -> str:
    return v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")


def parse_labels(s: str) -> dict:
    out, pos = {}, 0
    while pos < len(s):
        m = _LABEL.match(s, pos)
        if not m:
            break
        out[m.group(1)] = _unescape(m.group(2))
        pos = m.end()
    return out


def parse_exposition(text: str) -> dict:
    """Prometheus / OpenMetrics text -> {(name, labels tuple): value}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line.strip())
        if not m:
            continue
        name, labels, value = m.group(1), parse_labels(m.group(2) or ""), m.group(3)
        try:
            v = float(value)
        except ValueError:
            continue
        out[(name, tuple(sorted(labels.items())))] = v
    return out


# ------------------------------------------------------- a little of PromQL --
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')


def parse_matchers(s: str):
    out, pos = [], 0
    while pos < len(s.strip()):
        m = _MATCHER.match(s, pos)
        if not m:
            raise ValueError(f"bad matchers: {s!r}")
        out.append((m.group(1), m.group(2), _unescape(m.group(3))))
        pos = m.end()
    return out


def _matches(labels: dict, matchers) -> bool:
    for name, op, value in matchers:
        have = labels.get(name, "")
        if op == "=" and have != value:
            return False
        if op == "!=" and have == value:
            return False
        if op == "=~" and not re.fullmatch(value, have):
            return False
        if op == "!~" and re.fullmatch(value, have):
            return False
    return True


class Scrapes:
    """The scrapes as aligned time series, and the operations panels need.

    A "vector" is {labels tuple: [value per scrape]} with NaN where there is
    no value; rates use a sliding window of `window` seconds (the dashboard
    says [5m]; a short demo run needs a shorter one)."""

    def __init__(self, rows: list, window: float, instance: str | None = None):
        rows = sorted(rows, key=lambda r: r["t"])
        self.t = [float(r["t"]) for r in rows]
        self.window = window
        self.series: dict = {}
        n = len(rows)
        for i, r in enumerate(rows):
            inst = instance or r.get("instance") or "synapse-keys-worker"
            for (name, labels), v in parse_exposition(r["text"]).items():
                key = (name, tuple(sorted(dict(labels, instance=inst).items())))
                self.series.setdefault(key, [NAN] * n)[i] = v

    # selection
    def select(self, name: str, matchers: str = "") -> dict:
        ms = parse_matchers(matchers)
        full = name if name.startswith(PREFIX) else PREFIX + name
        return {labels: vals for (n, labels), vals in self.series.items() if n == full and _matches(dict(labels), ms)}

    def names(self) -> set:
        return {n for n, _ in self.series}

    # aggregation
    @staticmethod
    def aggregate(vec: dict, by, how: str = "sum") -> dict:
        """`sum by (by)`; by=None keeps every label (no aggregation)."""
        if by is None:
            return dict(vec)
        groups: dict = {}
        for labels, vals in vec.items():
            key = tuple((k, v) for k, v in labels if k in by)
            groups.setdefault(key, []).append(vals)
        out = {}
        for key, members in groups.items():
            agg = []
            for col in zip(*members):
                xs = [x for x in col if not math.isnan(x)]
                if not xs:
                    agg.append(NAN)
                elif how == "sum":
                    agg.append(sum(xs))
                elif how == "max":
                    agg.append(max(xs))
                elif how == "min":
                    agg.append(min(xs))
                else:
                    raise ValueError(how)
            out[key] = agg
        return out

    # counters
    def _window_start(self, i: int) -> int:
        j = i
        while j > 0 and self.t[j - 1] >= self.t[i] - self.window - 1e-6:
            j -= 1
        return j

    def _increase(self, vals: list, per_second: bool) -> list:
        out = []
        for i in range(len(vals)):
            j = self._window_start(i)
            pts = [(self.t[k], vals[k]) for k in range(j, i + 1) if not math.isnan(vals[k])]
            if len(pts) < 2:
                out.append(NAN)
                continue
            inc = 0.0
            for (_, a), (_, b) in zip(pts, pts[1:]):
                inc += b - a if b >= a else b  # a counter reset starts again from 0
            span = pts[-1][0] - pts[0][0]
            out.append(inc / span if per_second else inc * (self.window / span if span > 0 else 1.0))
        return out

    def rate(self, name: str, matchers: str = "", by=()) -> dict:
        vec = {k: self._increase(v, True) for k, v in self.select(name, matchers).items()}
        return self.aggregate(vec, by)

    def increase(self, name: str, matchers: str = "", by=None) -> dict:
        vec = {k: self._increase(v, False) for k, v in self.select(name, matchers).items()}
        return self.aggregate(vec, by)

    # gauges
    def gauge(self, name: str, matchers: str = "", by=None, how: str = "sum") -> dict:
        return self.aggregate(self.select(name, matchers), by, how)

    # histograms
    def quantile(self, q: float, name: str, matchers: str = "", by=()) -> dict:
        """histogram_quantile(q, sum by (le, by) (rate(name_bucket[w])))."""
        buckets = self.rate(name + "_bucket", matchers, by=tuple(by) + ("le",))
        groups: dict = {}
        for labels, vals in buckets.items():
            le = float(dict(labels)["le"].replace("+Inf", "inf"))
            key = tuple((k, v) for k, v in labels if k != "le")
            groups.setdefault(key, []).append((le, vals))
        out = {}
        for key, bs in groups.items():
            bs.sort(key=lambda b: b[0])
            out[key] = [_bucket_quantile(q, [(le, vals[i]) for le, vals in bs]) for i in range(len(self.t))]
        return out

    # arithmetic
    @staticmethod
    def binop(a: dict, b: dict, op) -> dict:
        out = {}
        for labels, av in a.items():
            bv = b.get(labels)
            if bv is None and len(b) == 1 and () in b:
                bv = b[()]
            if bv is None:
                continue
            out[labels] = [op(x, y) for x, y in zip(av, bv)]
        return out

    def div(self, a: dict, b: dict) -> dict:
        return self.binop(a, b, lambda x, y: x / y if y not in (0.0,) and not math.isnan(y) else NAN)

    def add(self, a: dict, b: dict) -> dict:
        return self.binop(a, b, lambda x, y: x + y)

    def or_zero(self, a: dict) -> dict:
        """`... or vector(0)` for an aggregate without labels."""
        if a:
            return {k: [0.0 if math.isnan(x) else x for x in v] for k, v in a.items()}
        return {(): [0.0] * len(self.t)}


def _bucket_quantile(q: float, buckets: list) -> float:
    """Prometheus' histogram_quantile over (upper bound, cumulative count)."""
    buckets = [(le, c) for le, c in buckets if not math.isnan(c)]
    if len(buckets) < 2 or buckets[-1][0] != INF:
        return NAN
    # Windowed deltas of cumulative buckets can be a hair non-monotonic.
    fixed, top = [], 0.0
    for le, c in buckets:
        top = max(top, c)
        fixed.append((le, top))
    total = fixed[-1][1]
    if total <= 0:
        return NAN
    rank = q * total
    b = next(i for i, (_, c) in enumerate(fixed) if c >= rank)
    if b == len(fixed) - 1:
        return fixed[-2][0]
    lower, below = (0.0, 0.0) if b == 0 else fixed[b - 1]
    upper, count = fixed[b]
    if count - below <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / (count - below)


# --------------------------------------------------- the per-panel mapping --
# Keyed by panel title; each entry gives one vector per target of the panel,
# in the order of the panel's `targets` (whose legendFormat names the series).
KQ = 'route=~"/_matrix/client/(r0|v3|unstable)/keys/query"'


def _error_ratio(s: Scrapes, status_re: str) -> dict:  # status_re: a matcher
    bad = s.or_zero(s.rate("http_requests_total", f"{KQ}, {status_re}"))
    return s.div(bad, s.rate("http_requests_total", KQ))


def _hit_ratio(s: Scrapes) -> dict:
    hits = s.rate("cache_hits_total", by=("cache",))
    misses = s.rate("cache_misses_total", by=("cache",))
    return s.div(hits, s.add(hits, misses))


PANELS = {
    # overview
    "Requests/s (/keys/query)": lambda s: [s.rate("http_requests_total", KQ)],
    "p99 latency (/keys/query)": lambda s: [s.quantile(0.99, "http_request_duration_seconds", KQ)],
    "Caches trusted": lambda s: [s.gauge("caches_trusted", by=(), how="min")],
    "Replication connected": lambda s: [s.gauge("replication_connected", by=(), how="min")],
    "Master breaker": lambda s: [s.gauge("master_breaker_open", by=(), how="max")],
    "DB pool in use": lambda s: [s.div(s.gauge("db_pool_connections", 'state="in_use"', by=()), s.gauge("db_pool_max_connections", by=()))],
    # HTTP
    "Request rate by route and status": lambda s: [s.rate("http_requests_total", by=("route", "status"))],
    "/keys/query latency p50 / p99": lambda s: [
        s.quantile(0.5, "http_request_duration_seconds", KQ),
        s.quantile(0.99, "http_request_duration_seconds", KQ),
    ],
    "Error ratio (non-2xx)": lambda s: [_error_ratio(s, 'status!~"2.."'), _error_ratio(s, 'status=~"5.."')],
    # caches
    "Cache hit ratio": lambda s: [_hit_ratio(s)],
    "Cache entries": lambda s: [s.gauge("cache_entries", by=("cache",))],
    "Cache evictions": lambda s: [s.rate("cache_evictions_total", by=("cache",))],
    "Stale loads dropped": lambda s: [s.rate("cache_stale_loads_dropped_total", by=("cache",))],
    # remote users and resyncs
    "Resync outcomes": lambda s: [s.rate("resyncs_total", by=("outcome",))],
    "Master breaker state": lambda s: [s.gauge("master_breaker_open", by=("instance",), how="max")],
    "Resync waiters": lambda s: [s.gauge("resync_waiters", by=("instance",))],
    "Destinations backing off": lambda s: [s.gauge("federation_destinations_backing_off", by=("instance",))],
    # replication
    "Replication connected / caught up": lambda s: [
        s.gauge("replication_connected"),
        s.gauge("replication_caught_up"),
        s.gauge("caches_trusted"),
    ],
    "Last replication message age": lambda s: [s.gauge("replication_last_message_age_milliseconds")],
    "Replication reconnects": lambda s: [s.increase("replication_reconnects_total")],
    "Caught-up rows": lambda s: [s.increase("replication_caught_up_rows_total")],
    # database
    "DB pool in use vs max": lambda s: [
        s.gauge("db_pool_connections", 'state="in_use"'),
        s.gauge("db_pool_connections", 'state="idle"'),
        s.gauge("db_pool_max_connections"),
    ],
}


# -------------------------------------------------------------- formatting --
def _si(v: float, unit: str = "") -> str:
    a = abs(v)
    for div, suf in ((1e9, " G"), (1e6, " M"), (1e3, " K")):
        if a >= div:
            return f"{v / div:.3g}{suf}{unit}"
    if a == 0:
        return f"0{(' ' + unit) if unit else ''}"
    text = f"{v:.3g}" if a >= 0.01 else f"{v:.2g}"
    return text + ((" " + unit) if unit else "")


def fmt_value(v: float, unit: str, decimals=None) -> str:
    if v is None or math.isnan(v):
        return "No data"
    if unit == "percentunit":
        d = 1 if decimals is None else decimals
        return f"{v * 100:.{d}f}%"
    if unit in ("s", "ms"):
        secs = v if unit == "s" else v / 1000.0
        if v < 0:
            return f"{v:g} {unit}"
        if secs == 0:
            return "0 s" if unit == "s" else "0 ms"
        if secs < 1e-3:
            return f"{secs * 1e6:.3g} µs"
        if secs < 1:
            return f"{secs * 1e3:.3g} ms"
        if secs < 60:
            return f"{secs:.3g} s"
        return f"{secs / 60:.3g} min"
    if decimals is not None:
        return f"{v:.{decimals}f}"
    if unit == "reqps":
        return _si(v, "req/s")
    if unit == "ops":
        return _si(v, "ops/s")
    return _si(v)


def fmt_tick(v: float, unit: str, decimals=None) -> str:
    """Axis labels: like fmt_value, without needless decimals."""
    if unit == "percentunit" and decimals is None:
        pct = v * 100
        return f"{pct:.0f}%" if abs(pct - round(pct)) < 1e-6 else f"{pct:.1f}%"
    return fmt_value(v, unit, decimals)


def _time_locator(mdates, span: float, most: int):
    """Ticks on round seconds or minutes, at most `most` of them."""
    for step in (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1800, 3600):
        if span / step <= most:
            break
    if step < 60:
        return mdates.SecondLocator(bysecond=range(0, 60, step))
    if step < 3600:
        return mdates.MinuteLocator(byminute=range(0, 60, step // 60))
    return mdates.HourLocator()


# ------------------------------------------------------------ Grafana look --
BG = "#111217"
PANEL_BG = "#181b1f"
BORDER = "#2c3036"
TEXT = "#ccccdc"
TEXT_DIM = "#9fa0ad"
GRID = "#26292f"
NAMED = {
    "green": "#73BF69", "yellow": "#FADE2A", "orange": "#FF9830", "red": "#F2495C",
    "blue": "#5794F2", "purple": "#B877D9", "dark-red": "#C4162A", "dark-green": "#37872D",
    "text": TEXT, "transparent": "#00000000",
}
CLASSIC = ["#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9",
           "#705DA0", "#37872D", "#FADE2A", "#447EBC", "#C15C17", "#890F02", "#0A437C"]
STAT_BG = {"#73BF69": "#37872D", "#F2495C": "#C4162A", "#FF9830": "#FA6400", "#FADE2A": "#E0B400"}


def color_of(name: str) -> str:
    return NAMED.get(name, name)


def legend_name(fmt: str, labels: dict, fallback: str) -> str:
    if fmt:
        return re.sub(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()
    if labels:
        return "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    return fallback


def series_style(panel: dict, name: str, index: int) -> dict:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    custom = defaults.get("custom", {})
    style = {"color": CLASSIC[index % len(CLASSIC)], "fill": custom.get("fillOpacity", 0) / 100.0,
             "width": custom.get("lineWidth", 1), "dash": None,
             "step": custom.get("lineInterpolation") == "stepAfter"}
    for o in panel.get("fieldConfig", {}).get("overrides", []):
        matcher = o.get("matcher", {})
        hit = (matcher.get("id") == "byName" and matcher.get("options") == name) or (
            matcher.get("id") == "byRegexp" and re.search(matcher.get("options", "$^"), name))
        if not hit:
            continue
        for prop in o.get("properties", []):
            if prop["id"] == "color":
                style["color"] = color_of(prop["value"].get("fixedColor", style["color"]))
            elif prop["id"] == "custom.lineWidth":
                style["width"] = prop["value"]
            elif prop["id"] == "custom.fillOpacity":
                style["fill"] = prop["value"] / 100.0
            elif prop["id"] == "custom.lineStyle" and prop["value"].get("fill") == "dash":
                style["dash"] = (0, (4, 3))
    return style


def stat_color(panel: dict, value: float) -> tuple[str, str | None]:
    """Colour and mapped text of a stat value, from mappings then thresholds."""
    d = panel.get("fieldConfig", {}).get("defaults", {})
    if not math.isnan(value):
        for m in d.get("mappings", []):
            if m.get("type") == "value":
                for k, res in m.get("options", {}).items():
                    if float(k) == value:
                        return color_of(res.get("color", "text")), res.get("text")
    steps = d.get("thresholds", {}).get("steps", [])
    color = "#5a5d66"
    if math.isnan(value):
        return color, None
    for s in steps:
        if s.get("value") is None or value >= s["value"]:
            color = color_of(s["color"])
    return color, None


# --------------------------------------------------------------- rendering --
def cmd_render(args) -> int:
    try:
        import matplotlib
    except ImportError:
        sys.exit("render needs matplotlib: python3 -m venv target/grafana-venv && target/grafana-venv/bin/pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyBboxPatch, Rectangle
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    dash = json.load(open(args.dashboard))
    rows = [json.loads(line) for line in open(args.scrapes) if line.strip()]
    if len(rows) < 2:
        sys.exit(f"{args.scrapes}: need at least two scrapes, have {len(rows)}")
    s = Scrapes(rows, args.rate_window, args.instance)
    wanted = set(re.findall(PREFIX + r"[a-zA-Z0-9_]+", json.dumps(dash)))
    missing = sorted(wanted - s.names())
    if missing:
        print("render: metrics the dashboard uses but the scrapes lack: " + ", ".join(missing), file=sys.stderr)
    xs = [t / 86400.0 for t in s.t]  # matplotlib date numbers (days since 1970)

    panels = dash["panels"]
    W = args.width
    pad, gap, cell = 12, 8, 30
    header = 88  # title bar + variables bar
    col = (W - 2 * pad - 23 * gap) / 24.0
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    H = int(header + bottom * (cell + gap) + pad)
    dpi = 100
    fig = plt.figure(figsize=(W / dpi, H / dpi), dpi=dpi, facecolor=BG)

    def rect(x, y, w, h):  # pixels from top-left -> figure fraction (l, b, w, h)
        return (x / W, 1 - (y + h) / H, w / W, h / H)

    # title bar
    bar = fig.add_axes(rect(0, 0, W, 48))
    bar.set_axis_off()
    bar.add_patch(Rectangle((0, 0), 1, 1, transform=bar.transAxes, color="#181b1f"))
    bar.axhline(0, color=BORDER, lw=1)
    bar.text(pad / W, 0.5, "Dashboards  /  ", color=TEXT_DIM, fontsize=11, va="center", transform=bar.transAxes)
    bar.text(pad / W + 0.062, 0.5, dash.get("title", ""), color=TEXT, fontsize=12.5, fontweight="bold", va="center",
             transform=bar.transAxes)
    t0 = dt.datetime.fromtimestamp(s.t[0], dt.timezone.utc)
    t1 = dt.datetime.fromtimestamp(s.t[-1], dt.timezone.utc)
    span = f"{t0:%Y-%m-%d %H:%M:%S} to {t1:%H:%M:%S} UTC"
    bar.text(1 - pad / W, 0.5, f"{span}   \u27f3 {dash.get('refresh', '')}", color=TEXT, fontsize=10,
             ha="right", va="center", transform=bar.transAxes)
    # variables bar
    vb = fig.add_axes(rect(0, 48, W, 40))
    vb.set_axis_off()
    x = pad
    insts = sorted({dict(k[1]).get("instance", "") for k in s.series})
    values = {"datasource": "Prometheus", "instance": "All" if len(insts) != 1 else insts[0]}
    for v in dash.get("templating", {}).get("list", []):
        label = v.get("label") or v["name"]
        val = values.get(v["name"], "All")
        lw = 9 + 6.8 * len(label)
        vw = 22 + 6.8 * len(val)
        vb.add_patch(FancyBboxPatch(((x) / W, 0.2), lw / W, 0.6, boxstyle="square,pad=0", transform=vb.transAxes,
                                    facecolor="#22252b", edgecolor=BORDER, lw=0.8))
        vb.text((x + 6) / W, 0.5, label, color=TEXT, fontsize=9, va="center", transform=vb.transAxes)
        vb.add_patch(FancyBboxPatch(((x + lw) / W, 0.2), vw / W, 0.6, boxstyle="square,pad=0", transform=vb.transAxes,
                                    facecolor=BG, edgecolor=BORDER, lw=0.8))
        vb.text((x + lw + 8) / W, 0.5, val + "  \u25be", color=TEXT, fontsize=9, va="center", transform=vb.transAxes)
        x += lw + vw + 14
    note = (f"rendered offline by contrib/grafana/render.py from {len(rows)} scrapes of /metrics; "
            f"rate windows {args.rate_window:g}s (the dashboard uses [5m])")
    vb.text(1 - pad / W, 0.5, note, color=TEXT_DIM, fontsize=8.5, ha="right", va="center", transform=vb.transAxes)

    time_fmt = mdates.DateFormatter("%H:%M:%S", tz=dt.timezone.utc)
    drawn = 0
    for p in panels:
        g = p["gridPos"]
        px = pad + g["x"] * (col + gap)
        py = header + g["y"] * (cell + gap)
        pw = g["w"] * col + (g["w"] - 1) * gap
        ph = g["h"] * cell + (g["h"] - 1) * gap
        if p["type"] == "row":
            ax = fig.add_axes(rect(px, py, pw, ph))
            ax.set_axis_off()
            ax.text(0, 0.35, "\u25be  " + p["title"], color=TEXT, fontsize=11.5, fontweight="bold", va="center",
                    transform=ax.transAxes)
            continue
        fn = PANELS.get(p["title"])
        vectors = fn(s) if fn else []
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        decimals = p.get("fieldConfig", {}).get("defaults", {}).get("decimals")
        frame = fig.add_axes(rect(px, py, pw, ph))
        frame.set_axis_off()
        frame.add_patch(FancyBboxPatch((0, 0), 1, 1, boxstyle="round,pad=0,rounding_size=0.004",
                                       transform=frame.transAxes, facecolor=PANEL_BG, edgecolor=BORDER, lw=0.8,
                                       mutation_aspect=pw / ph))
        title = p["title"] if fn else p["title"] + "   (no mapping in render.py)"
        frame.text(8 / pw, 1 - 15 / ph, title, color=TEXT, fontsize=9.5, fontweight="bold", va="center",
                   transform=frame.transAxes)

        if p["type"] == "stat":
            vec = vectors[0] if vectors else {}
            vals = next(iter(vec.values()), [])
            last = next((v for v in reversed(vals) if not math.isnan(v)), NAN)
            color, text = stat_color(p, last)
            inner = fig.add_axes(rect(px + 1, py + 28, pw - 2, ph - 29))
            inner.set_axis_off()
            inner.add_patch(Rectangle((0, 0), 1, 1, transform=inner.transAxes, color=STAT_BG.get(color, color)))
            if vals and any(not math.isnan(v) for v in vals):
                spark = fig.add_axes(rect(px + 1, py + ph - 0.45 * (ph - 29), pw - 2, 0.45 * (ph - 29) - 1))
                spark.set_axis_off()
                clean = [0.0 if math.isnan(v) else v for v in vals]
                lo, hi = min(clean), max(clean)
                spark.fill_between(xs, clean, lo - (hi - lo) * 0.05 - 1e-9, color="white", alpha=0.16, lw=0)
                spark.plot(xs, clean, color="white", alpha=0.35, lw=1)
                spark.set_xlim(xs[0], xs[-1])
                spark.set_ylim(lo - (hi - lo) * 0.05 - 1e-9, hi + (hi - lo) * 0.6 + 1e-9)
            label = text if text is not None else fmt_value(last, unit, decimals)
            inner.text(0.5, 0.55, label, color="white", fontsize=22, fontweight="bold", ha="center", va="center",
                       transform=inner.transAxes)
            drawn += 1
            continue

        # timeseries: build the series list with Grafana's legend names
        series = []
        for target, vec in zip(p.get("targets", []), vectors):
            for labels, vals in sorted(vec.items()):
                name = legend_name(target.get("legendFormat", ""), dict(labels), p["title"])
                series.append((name, vals))
        has_data = any(not math.isnan(v) for _, vals in series for v in vals)
        # legend layout
        legend_rows, ncol = 0, 1
        if series:
            longest = max(len(n) for n, _ in series)
            colw = 6.0 * longest + 34
            ncol = max(1, min(len(series), int((pw - 16) // colw)))
            legend_rows = math.ceil(len(series) / ncol)
        leg_h = legend_rows * 14 + (6 if legend_rows else 0)
        left, top, bot = 54, 28, 20 + leg_h
        ax = fig.add_axes(rect(px + left, py + top, pw - left - 12, ph - top - bot))
        ax.set_facecolor(PANEL_BG)
        for sp in ax.spines.values():
            sp.set_visible(False)
        ax.grid(True, color=GRID, lw=0.8)
        ax.set_axisbelow(True)
        ax.tick_params(colors=TEXT_DIM, labelsize=7.5, length=0, pad=3)
        ax.xaxis.set_major_formatter(time_fmt)
        ax.xaxis.set_major_locator(_time_locator(mdates, s.t[-1] - s.t[0], max(2, int((pw - left) // 75))))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=max(2, int((ph - top - bot) // 34)), integer=decimals == 0))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos, u=unit, d=decimals: fmt_tick(v, u, d)))
        ax.set_xlim(xs[0], xs[-1])
        handles, labels = [], []
        ymin, ymax = INF, -INF
        for i, (name, vals) in enumerate(series):
            st = series_style(p, name, i)
            kw = {"color": st["color"], "lw": st["width"] + 0.3}
            if st["dash"]:
                kw["linestyle"] = st["dash"]
            draw = "steps-post" if st["step"] else "default"
            line, = ax.plot(xs, vals, drawstyle=draw, **kw)
            if st["fill"] > 0:
                ax.fill_between(xs, vals, 0, step="post" if st["step"] else None, color=st["color"],
                                alpha=st["fill"], lw=0)
            finite = [v for v in vals if not math.isnan(v)]
            if finite:
                ymin, ymax = min(ymin, min(finite)), max(ymax, max(finite))
            handles.append(Line2D([], [], color=st["color"], lw=3, linestyle=kw.get("linestyle", "-")))
            labels.append(name)
        d = p.get("fieldConfig", {}).get("defaults", {})
        lo = d.get("min", min(0.0, ymin) if ymin != INF else 0.0)
        hi = d.get("max")
        if hi is None:
            hi = ymax if ymax != -INF else 1.0
            if hi <= lo:
                hi = lo + 1.0
            hi = hi + (hi - lo) * 0.08
        elif ymax != -INF and ymax > hi:
            hi = ymax
        if d.get("max") is not None and d.get("min") is not None and hi - lo <= 1.0 and decimals == 0:
            hi = hi + 0.08
        ax.set_ylim(lo, hi)
        if not has_data:
            ax.text(0.5, 0.5, "No data", color=TEXT_DIM, fontsize=11, ha="center", va="center", transform=ax.transAxes)
        if handles:
            lx, ly = (px + 10) / W, 1 - (py + ph - leg_h - 2) / H
            fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(lx, ly), bbox_transform=fig.transFigure,
                       ncol=ncol, frameon=False, fontsize=7.5, labelcolor=TEXT, handlelength=1.1,
                       handletextpad=0.5, columnspacing=1.4, borderaxespad=0, borderpad=0, labelspacing=0.35)
        drawn += 1

    fig.savefig(args.out, dpi=dpi, facecolor=BG)
    plt.close(fig)
    try:  # Pillow comes with matplotlib: drop the alpha channel, and colours if still too big
        from PIL import Image

        img = Image.open(args.out).convert("RGB")
        img.save(args.out, optimize=True)
        if args.max_kb and os.path.getsize(args.out) > args.max_kb * 1024:
            img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=0).save(args.out, optimize=True)
    except Exception as e:  # noqa: BLE001 - keep matplotlib's file
        print(f"could not shrink the PNG: {e}", file=sys.stderr)
    print(f"wrote {args.out}: {drawn} panels, {len(rows)} scrapes over {s.t[-1] - s.t[0]:.0f}s, "
          f"{os.path.getsize(args.out) // 1024} KiB")
    return 0


# --------------------------------------------------------------- collecting --
def metrics_url(url: str) -> str:
    u = url.rstrip("/")
    return u if u.endswith("/metrics") else u + "/metrics"


def cmd_collect(args) -> int:
    url = metrics_url(args.url)
    instance = urllib.parse.urlsplit(url).netloc
    deadline_ready = time.monotonic() + args.wait
    while True:  # wait for the service to answer at all
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                r.read()
            break
        except OSError as e:
            if time.monotonic() > deadline_ready:
                sys.exit(f"collect: {url} did not answer within {args.wait:g}s: {e}")
            time.sleep(0.5)
    n = max(1, int(args.seconds / args.interval) + 1)
    start, ok = time.monotonic(), 0
    with open(args.out, "w") as out:
        for i in range(n):
            due = start + i * args.interval
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                with urllib.request.urlopen(url, timeout=max(1.0, args.interval * 0.9)) as r:
                    text = r.read().decode("utf-8", "replace")
            except OSError as e:
                print(f"collect: scrape {i} failed: {e}", file=sys.stderr)
                continue
            out.write(json.dumps({"t": round(time.time(), 3), "text": text, "instance": instance}) + "\n")
            out.flush()
            ok += 1
    print(f"collect: {ok}/{n} scrapes of {url} written to {args.out}")
    return 0 if ok >= 2 else 1


# ------------------------------------------------------------------ traffic --
def _b64(n: int) -> str:
    return base64.b64encode(os.urandom(n)).decode().rstrip("=")


class Http:
    """Tiny JSON client for loopback services."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")

    def call(self, method: str, path: str, body=None, token: str | None = None, raw: bytes | None = None,
             timeout: float = 15.0):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, self._decode(r.read())
        except urllib.error.HTTPError as e:
            return e.code, self._decode(e.read())

    @staticmethod
    def _decode(data: bytes):
        try:
            return json.loads(data or b"null")
        except ValueError:
            return data


def _device_keys(user: str, device: str) -> dict:
    return {"device_keys": {
        "user_id": user, "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {f"curve25519:{device}": _b64(32), f"ed25519:{device}": _b64(32)},
        # Synapse does not verify device-key self-signatures on upload.
        "signatures": {user: {f"ed25519:{device}": _b64(64)}},
    }}


def _setup_users(syn: Http, n: int, devices_per_user: int, tag: str) -> list:
    users = []
    for i in range(n):
        name, password = f"dash{tag}u{i}", "pw-" + _b64(12)
        st, body = syn.call("POST", "/_matrix/client/v3/register",
                            {"username": name, "password": password, "auth": {"type": "m.login.dummy"},
                             "initial_device_display_name": "phone"})
        if st != 200:
            sys.exit(f"traffic: register {name}: {st} {body}")
        u = {"user_id": body["user_id"], "token": body["access_token"], "password": password, "devices": []}
        st, _ = syn.call("POST", "/_matrix/client/v3/keys/upload", _device_keys(u["user_id"], body["device_id"]), u["token"])
        if st != 200:
            sys.exit(f"traffic: keys/upload for {u['user_id']}: {st}")
        u["devices"].append(body["device_id"])
        for _ in range(devices_per_user - 1):
            _login_device(syn, u, "laptop")
        if i % 2 == 0:  # half the users have a master cross-signing key
            pub = _b64(32)
            key = {"master_key": {"user_id": u["user_id"], "usage": ["master"], "keys": {f"ed25519:{pub}": pub}}}
            st, b = syn.call("POST", "/_matrix/client/v3/keys/device_signing/upload", key, u["token"])
            if st == 401 and isinstance(b, dict) and "session" in b:  # UIA, if the first upload needs it
                key["auth"] = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": u["user_id"]},
                               "password": password, "session": b["session"]}
                st, b = syn.call("POST", "/_matrix/client/v3/keys/device_signing/upload", key, u["token"])
            if st != 200:
                print(f"traffic: cross-signing upload for {u['user_id']}: {st} {b}", file=sys.stderr)
        users.append(u)
    return users


def _login_device(syn: Http, u: dict, label: str) -> str | None:
    st, body = syn.call("POST", "/_matrix/client/v3/login",
                        {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": u["user_id"]},
                         "password": u["password"], "initial_device_display_name": label})
    if st != 200:
        return None
    syn.call("POST", "/_matrix/client/v3/keys/upload", _device_keys(u["user_id"], body["device_id"]), body["access_token"])
    u["devices"].append(body["device_id"])
    return body["device_id"]


def _redis_cmd(host: str, port: int, *parts: str) -> bytes:
    msg = f"*{len(parts)}\r\n".encode() + b"".join(f"${len(p.encode())}\r\n{p}\r\n".encode() for p in parts)
    with socket.create_connection((host, port), timeout=3) as s:
        s.sendall(msg)
        data = b""
        s.settimeout(1)
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                if data.startswith(b"+") or data.startswith(b"-") or data.startswith(b":"):
                    if data.endswith(b"\r\n"):
                        break
                elif data.startswith(b"$"):
                    head, _, rest = data.partition(b"\r\n")
                    if int(head[1:]) < 0 or len(rest) >= int(head[1:]) + 2:
                        break
        except socket.timeout:
            pass
    return data


def _local_ports_of(pid: int) -> set:
    """Local TCP ports of sockets the process holds (Linux /proc)."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[9] in inodes:
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def cut_redis(redis_url: str, pid: int) -> int:
    """Close the service's own Redis connections (CLIENT KILL), nobody else's."""
    u = urllib.parse.urlsplit(redis_url)
    host, port = u.hostname or "127.0.0.1", u.port or 6379
    ours = _local_ports_of(pid)
    listing = _redis_cmd(host, port, "CLIENT", "LIST").decode(errors="replace")
    killed = 0
    for line in listing.splitlines():
        m = re.search(r"\baddr=(\S+):(\d+)\b", line)
        if m and int(m.group(2)) in ours:
            if _redis_cmd(host, port, "CLIENT", "KILL", f"{m.group(1)}:{m.group(2)}").startswith(b"+OK"):
                killed += 1
    return killed


def cmd_traffic(args) -> int:
    for url in (args.synapse, args.service):
        host = urllib.parse.urlsplit(url).hostname or ""
        if not (host == "localhost" or host.startswith("127.") or host == "::1"):
            sys.exit(f"traffic: refusing a non-loopback target {url}")
    svc, syn = Http(args.service), Http(args.synapse)
    deadline = time.monotonic() + 60
    while True:
        try:
            if svc.call("GET", "/health", timeout=2)[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit("traffic: the service did not become healthy within 60s")
        time.sleep(0.5)
    tag = f"{int(time.time()) % 100000}"
    t0 = time.monotonic()
    users = _setup_users(syn, args.users, 2, tag)
    print(f"traffic: {len(users)} users with keys set up on Synapse in {time.monotonic() - t0:.1f}s", flush=True)
    remote = [f"@{n}:{host}" for n, host in (("alice", "nowhere.invalid"), ("bob", "gone.invalid"),
                                             ("carol", "down.invalid"))]
    paths = ["/_matrix/client/v3/keys/query"] * 18 + ["/_matrix/client/r0/keys/query", "/_matrix/client/unstable/keys/query"]

    # Load shape: fractions of the run and the target request rate during each.
    phases = [(0.0, 0.25 * args.rps), (0.15, 0.6 * args.rps), (0.45, args.rps), (0.7, 0.4 * args.rps), (0.85, 0.8 * args.rps)]
    counts: dict = {}
    lock = threading.Lock()
    start = time.monotonic()
    end = start + args.seconds
    state = {"next": start, "sent": 0, "remote_seq": 0}

    def target_rps(now: float) -> float:
        frac = (now - start) / args.seconds
        return [r for f, r in phases if frac >= f][-1]

    def one(rng: random.Random):
        k = rng.random()
        path = "/_matrix/client/v3/keys/query"
        token = rng.choice(users)["token"]
        body = {"device_keys": {}, "timeout": 3000}
        for u in rng.sample(users, rng.randint(1, min(6, len(users)))):
            body["device_keys"][u["user_id"]] = [] if rng.random() < 0.8 else u["devices"][:1]
        raw = None
        if k < 0.06:
            token = "syt_bad_" + _b64(9)  # unknown token: 401 M_UNKNOWN_TOKEN
        elif k < 0.08:
            token = None  # no token: 401 M_MISSING_TOKEN
        elif k < 0.10:
            raw = b'{"device_keys": ["not", "an", "object"]}'  # 400 M_BAD_JSON
        elif k < 0.14:
            path = rng.choice(paths[-2:])  # older clients: r0 and unstable
        elif k < 0.22:
            with lock:
                state["remote_seq"] += 1
                seq = state["remote_seq"]
            body["device_keys"][rng.choice(remote)] = []
            if seq % 15 == 0 and seq <= 150:  # now and then a server we have not seen yet
                body["device_keys"][f"@u{seq}:new{seq}.invalid"] = []
        st, _ = svc.call("POST", path, body, token, raw=raw, timeout=10)
        with lock:
            counts[st] = counts.get(st, 0) + 1

    def worker(idx: int):
        rng = random.Random(args.seed * 1000 + idx)
        while True:
            with lock:
                now = time.monotonic()
                if now >= end or state["sent"] >= args.max_requests:
                    return
                state["next"] = max(state["next"], now - 0.5) + 1.0 / target_rps(now)
                due = state["next"]
                state["sent"] += 1
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                one(rng)
            except OSError as e:
                with lock:
                    counts[type(e).__name__] = counts.get(type(e).__name__, 0) + 1

    def churn():
        """Key changes while the load runs: new devices and renamed ones."""
        rng = random.Random(args.seed + 7)
        n = 0
        while time.monotonic() < end - 2 and n < 60:
            time.sleep(args.churn_every)
            u = rng.choice(users)
            if n % 2 == 0:
                _login_device(syn, u, f"device {n}")
            else:
                syn.call("PUT", f"/_matrix/client/v3/devices/{u['devices'][0]}", {"display_name": f"phone {n}"}, u["token"])
            n += 1

    def resync_rpc():
        """What a client_reader worker sends: resyncs of remote users."""
        rng = random.Random(args.seed + 11)
        n = 0
        while time.monotonic() < end - 1 and n < 600:
            time.sleep(args.resync_every)
            host = rng.choice(remote).split(":", 1)[1]
            ids = [u for u in remote if u.endswith(":" + host)] + [f"@r{n % 5}:{host}"]
            st, _ = svc.call("POST", f"/_synapse/replication/multi_user_device_resync/{tag}-{n}", {"user_ids": ids},
                             args.replication_secret, timeout=15)
            with lock:
                counts[f"rpc {st}"] = counts.get(f"rpc {st}", 0) + 1
            n += 1

    def cut():
        """Keep cutting the service's Redis link for a few seconds: the stream
        is down, the caches are bypassed, then it reconnects and catches up."""
        time.sleep(args.seconds * args.cut_redis_at)
        killed, until, writes = 0, time.monotonic() + args.cut_redis_for, 0
        while time.monotonic() < until:
            try:
                killed += cut_redis(args.redis_url, args.service_pid)
            except OSError as e:
                print(f"traffic: could not cut Redis: {e}", file=sys.stderr)
                return
            if writes < 3:  # changes while the stream is down come back by catch-up
                _login_device(syn, users[writes], "during outage")
                writes += 1
            time.sleep(0.2)
        print(f"traffic: closed {killed} Redis connection(s) of pid {args.service_pid} "
              f"over {args.cut_redis_for:g}s", flush=True)

    def pause():
        """Freeze the device-lists writer (SIGSTOP), as if it hung."""
        time.sleep(args.seconds * args.pause_at)
        print(f"traffic: pausing pid {args.pause_pid} for {args.pause_seconds:g}s", flush=True)
        os.kill(args.pause_pid, signal.SIGSTOP)
        try:
            time.sleep(args.pause_seconds)
        finally:
            os.kill(args.pause_pid, signal.SIGCONT)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.concurrency)]
    threads.append(threading.Thread(target=churn, daemon=True))
    if args.replication_secret:
        threads.append(threading.Thread(target=resync_rpc, daemon=True))
    if args.pause_pid is not None and args.pause_pid <= 1:
        sys.exit("traffic: --pause-pid must name the test Synapse's process")
    if args.redis_url and args.service_pid:
        threads.append(threading.Thread(target=cut, daemon=True))
    if args.pause_pid:
        threads.append(threading.Thread(target=pause, daemon=False))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, end - time.monotonic() + 15))
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])))
    print(f"traffic: {sum(counts.values())} requests in {time.monotonic() - start:.0f}s ({summary})", flush=True)
    return 0


# --------------------------------------------------------------------- demo --
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cmd_demo(args) -> int:
    """Inside `SKW_TEST_CMD=... bash scripts/test.sh`: start the service on the
    test stack, scrape it while `traffic` runs, stop it, optionally render."""
    env = os.environ
    need = ["SKW_TEST_SYNAPSE_URL", "SKW_TEST_HOMESERVER_YAML", "SKW_TEST_REDIS_URL",
            "SKW_TEST_REPLICATION_SECRET", "SKW_TEST_SYNAPSE_PID"]
    missing = [n for n in need if not env.get(n)]
    if missing:
        sys.exit(f"demo: run me as SKW_TEST_CMD of scripts/test.sh ({', '.join(missing)} not set)")
    if not os.access(args.bin, os.X_OK):
        sys.exit(f"demo: {args.bin} is not an executable (cargo build --release first?)")
    import subprocess

    port = _free_port()
    service = f"http://127.0.0.1:{port}"
    child_env = dict(env, SYNAPSE_KEYS_WORKER_CACHE_TTL_MS=str(args.cache_ttl_ms))
    log = open(args.log, "w")
    proc = subprocess.Popen([args.bin, "-c", env["SKW_TEST_HOMESERVER_YAML"], "--listen", f"127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, env=child_env)
    print(f"demo: {args.bin} (pid {proc.pid}) on {service}, log in {args.log}", flush=True)
    try:
        collector = threading.Thread(target=cmd_collect, args=(argparse.Namespace(
            url=service, seconds=args.seconds + 12, interval=1.0, wait=60.0, out=args.out),), daemon=True)
        collector.start()
        cmd_traffic(argparse.Namespace(
            synapse=env["SKW_TEST_SYNAPSE_URL"], service=service, seconds=args.seconds, rps=args.rps,
            concurrency=6, max_requests=20000, users=12, churn_every=4.0, seed=args.seed,
            redis_url=env["SKW_TEST_REDIS_URL"], service_pid=proc.pid, cut_redis_at=0.7, cut_redis_for=5.0,
            replication_secret=env["SKW_TEST_REPLICATION_SECRET"], resync_every=1.0,
            pause_pid=int(env["SKW_TEST_SYNAPSE_PID"]) if args.pause_writer else None, pause_at=0.2,
            pause_seconds=6.0))
        collector.join(timeout=args.seconds + 90)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    if args.png:
        return cmd_render(argparse.Namespace(dashboard=DEFAULT_DASHBOARD, scrapes=args.out, out=args.png,
                                             rate_window=15.0, instance=None, width=1800, max_kb=300))
    return 0


# --------------------------------------------------------------------- main --
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("render", help="draw the dashboard from scrapes into a PNG (needs matplotlib)")
    r.add_argument("--dashboard", default=DEFAULT_DASHBOARD, help="dashboard JSON (default: next to this script)")
    r.add_argument("--scrapes", required=True, help="JSON-lines file written by `collect`")
    r.add_argument("--out", required=True, help="PNG to write")
    r.add_argument("--rate-window", type=float, default=15.0, help="seconds of counter history per rate point")
    r.add_argument("--instance", help="instance label (default: the one `collect` recorded)")
    r.add_argument("--width", type=int, default=1800, help="picture width in pixels")
    r.add_argument("--max-kb", type=int, default=300, help="quantise the PNG to 256 colours above this size (0: never)")
    r.set_defaults(fn=cmd_render)

    c = sub.add_parser("collect", help="scrape /metrics every --interval seconds into JSON lines")
    c.add_argument("--url", required=True, help="service base URL (or its /metrics URL)")
    c.add_argument("--seconds", type=float, default=60.0)
    c.add_argument("--interval", type=float, default=1.0)
    c.add_argument("--wait", type=float, default=60.0, help="wait this long for the first answer")
    c.add_argument("--out", required=True)
    c.set_defaults(fn=cmd_collect)

    t = sub.add_parser("traffic", help="bounded loopback /keys/query load (users created on Synapse first)")
    t.add_argument("--synapse", required=True, help="Synapse client API base URL (loopback)")
    t.add_argument("--service", required=True, help="synapse-keys-worker base URL (loopback)")
    t.add_argument("--seconds", type=float, default=75.0)
    t.add_argument("--rps", type=float, default=80.0, help="peak request rate")
    t.add_argument("--concurrency", type=int, default=6)
    t.add_argument("--max-requests", type=int, default=20000)
    t.add_argument("--users", type=int, default=12)
    t.add_argument("--churn-every", type=float, default=4.0, help="seconds between key changes")
    t.add_argument("--redis-url", help="with --service-pid: cut the service's Redis link once mid-run")
    t.add_argument("--service-pid", type=int)
    t.add_argument("--cut-redis-at", type=float, default=0.7, help="when to cut, as a fraction of the run")
    t.add_argument("--cut-redis-for", type=float, default=5.0, help="seconds to keep the link cut")
    t.add_argument("--replication-secret", help="also send resync RPCs (as a client_reader would) for remote users")
    t.add_argument("--resync-every", type=float, default=1.0, help="seconds between resync RPCs")
    t.add_argument("--pause-pid", type=int, help="SIGSTOP this process (the device-lists writer) once mid-run")
    t.add_argument("--pause-at", type=float, default=0.2, help="when to pause it, as a fraction of the run")
    t.add_argument("--pause-seconds", type=float, default=6.0, help="how long to keep it stopped")
    t.add_argument("--seed", type=int, default=1)
    t.set_defaults(fn=cmd_traffic)

    d = sub.add_parser("demo", help="inside scripts/test.sh: run the service, traffic and collect (then render)")
    d.add_argument("--bin", default="target/release/synapse-keys-worker", help="the service binary")
    d.add_argument("--out", default="target/skw-scrapes.jsonl", help="scrapes file to write")
    d.add_argument("--png", help="also render this PNG at the end (needs matplotlib)")
    d.add_argument("--log", default="target/skw-keys-worker.log", help="the service's log")
    d.add_argument("--seconds", type=float, default=75.0, help="length of the traffic")
    d.add_argument("--rps", type=float, default=80.0, help="peak request rate")
    d.add_argument("--cache-ttl-ms", type=int, default=20000, help="cache_ttl_ms for the run (short, to show evictions)")
    d.add_argument("--no-pause-writer", dest="pause_writer", action="store_false",
                   help="do not SIGSTOP the test Synapse for 6 s (the breaker then stays closed)")
    d.add_argument("--seed", type=int, default=1)
    d.set_defaults(fn=cmd_demo)

    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
