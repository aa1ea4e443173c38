#!/usr/bin/env python3
"""Check the dashboard's queries against a real Prometheus and draw them.

    render.py --prometheus /usr/bin/prometheus --target 127.0.0.1:8585 --out dashboard.png --seconds 90
    render.py ... --until-eof     (record until standard input is closed)

Starts Prometheus on a free loopback port with a throw-away storage directory,
scraping each --target every second as job "synapse-keys-worker"; prints a
line starting with "recording" once every target has been scraped; records
for --seconds (or until stdin closes); then asks Prometheus for the values of
the dashboard's template variables and for every query of every panel over
the recorded span (/api/v1/query_range), with the variables put in as Grafana
would. Any query Prometheus refuses, or that returns no series or only NaN,
fails the run (exit status 1, naming the panel and the query); otherwise the
panels are drawn in the dashboard's grid with matplotlib into --out.
Prometheus is stopped on exit, on an error and on SIGINT or SIGTERM.
"""

import argparse
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates  # noqa: E402 (after choosing the backend)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402 (comes with matplotlib)

HERE = os.path.dirname(os.path.abspath(__file__))
SCRAPE_S = 1
JOB = "synapse-keys-worker"
MAX_POINTS = 600  # per series, as a panel some 600 pixels wide asks of Grafana


class Failed(Exception):
    pass


# ----------------------------------------------------------------- Prometheus --
def api(base: str, path: str, **params):
    """The `data` of a Prometheus API answer; Failed with its error otherwise."""
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            body = json.load(answer)
    except urllib.error.HTTPError as e:  # a bad query: the reason is in the body
        try:
            body = json.load(e)
        except ValueError:
            raise Failed(f"HTTP {e.code} from {path}") from None
    if body.get("status") != "success":
        raise Failed(f"{body.get('errorType')}: {body.get('error')}")
    return body["data"]


def poll(what: str, seconds: float, check):
    """check()'s first truthy answer, asking every 100 ms; Failed after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            got = check()
        except (OSError, Failed):
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise Failed(f"{what} within {seconds:g} s")
        time.sleep(0.1)


def die_with_parent():
    """In the child: get SIGTERM if this script dies, even by SIGKILL (Linux)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def start_prometheus(binary: str, targets: list, workdir: str):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    listen = "127.0.0.1:%d" % port.getsockname()[1]
    port.close()
    config = os.path.join(workdir, "prometheus.yml")
    with open(config, "w") as f:  # JSON is YAML
        json.dump({"global": {"scrape_interval": f"{SCRAPE_S}s", "scrape_timeout": f"{SCRAPE_S}s"},
                   "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}]}, f)
    log = open(os.path.join(workdir, "prometheus.log"), "w")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={workdir}/data",
                             f"--web.listen-address={listen}"], stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, preexec_fn=die_with_parent if sys.platform == "linux" else None)
    return proc, f"http://{listen}", log.name


def scraped_after(url: str, targets: list, since: float):
    """The time of the oldest of the targets' last scrapes, if all are after `since`."""
    got = api(url, "/api/v1/query", query=f'timestamp(up{{job="{JOB}"}} == 1)')["result"]
    at = {r["metric"]["instance"]: float(r["value"][1]) for r in got}
    oldest = min(at.get(t, 0) for t in targets)
    return oldest if oldest > since else None


# -------------------------------------------------------- Grafana's variables --
def regex_escape(value: str) -> str:
    """As Grafana escapes a multi-value variable's values for Prometheus."""
    return re.sub(r"[\\^$*+?.()|{}\[\]]", lambda m: "\\\\" + m.group(0), value)


def variables(dash: dict, url: str, start: float, end: float, step: int) -> dict:
    """Name -> text to put in queries: built-ins, then the dashboard's own."""
    span = round(end - start)
    out = {"__interval": f"{step}s", "__interval_ms": str(step * 1000),
           "__rate_interval": f"{max(step + SCRAPE_S, 4 * SCRAPE_S)}s",
           "__range": f"{span}s", "__range_s": str(span), "__range_ms": str(span * 1000)}
    for v in dash.get("templating", {}).get("list", []):
        name, query = v["name"], v.get("query")
        if v["type"] == "datasource":
            continue  # every query goes to this Prometheus
        if v["type"] == "query":
            text = query.get("query", "") if isinstance(query, dict) else query
            m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", text)
            if not m:
                raise Failed(f"variable {name}: only label_values(<selector>, <label>) is supported: {text}")
            where = {"match[]": m.group(1), "start": start, "end": end}
            values = api(url, f"/api/v1/label/{m.group(2)}/values", **where)
        elif v["type"] == "custom":
            values = [s.strip() for s in query.split(",")]
        elif v["type"] == "constant":
            values = [query]
        else:
            raise Failed(f"variable {name}: type {v['type']} is not supported")
        if v.get("regex"):
            values = [x for x in values if re.search(v["regex"], x)]
        if not values:
            raise Failed(f"variable {name} has no value: {query}")
        print(f"${name}: {', '.join(values)}", flush=True)
        if v.get("multi") or v.get("includeAll"):  # "All" selected: every value
            out[name] = "(" + "|".join(map(regex_escape, values)) + ")" if len(values) > 1 else regex_escape(values[0])
        else:
            out[name] = values[0]
    return out


def substitute(expr: str, values: dict) -> str:
    def one(m):
        name, fmt = m.group(1) or m.group(3) or m.group(4), m.group(2)
        if name not in values or fmt not in (None, "regex"):
            raise Failed(f"cannot substitute {m.group(0)}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)|\[\[(\w+)\]\]", one, expr)


def panels_of(dash: dict) -> list:
    """Every panel, those inside collapsed rows included, rows as well."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def evaluate(dash: dict, url: str, start: float, end: float) -> dict:
    """Panel id -> [(legend, {timestamp: value})]; Failed naming every bad query."""
    step = max(SCRAPE_S, math.ceil((end - start) / MAX_POINTS))
    values = variables(dash, url, start, end, step)
    results, problems, queries = {}, [], 0
    for p in panels_of(dash):
        for t in p.get("targets") or []:
            if t.get("hide") or not t.get("expr"):
                continue
            queries += 1
            where = f'panel "{p.get("title")}" query {t.get("refId", "?")}: {t["expr"]}'
            try:
                expr = substitute(t["expr"], values)
                got = api(url, "/api/v1/query_range", query=expr, start=start, end=end, step=step)["result"]
                if not got:
                    raise Failed("no series")
                if all(math.isnan(float(v)) for r in got for _, v in r["values"]):
                    raise Failed("no value, only NaN")
            except Failed as e:
                problems.append(f"{where}\n    {e}")
                continue
            for r in got:
                points = {round(ts): float(v) for ts, v in r["values"]}
                results.setdefault(p["id"], []).append((legend(t.get("legendFormat", ""), r["metric"], expr), points))
    if problems:
        raise Failed(f"{len(problems)} of {queries} queries failed:\n" + "\n".join(problems))
    print(f"all {queries} queries returned data (step {step}s, $__rate_interval {values['__rate_interval']})",
          flush=True)
    return results


def legend(fmt: str, labels: dict, expr: str) -> str:
    if fmt and fmt != "__auto":
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()
    shown = {k: v for k, v in labels.items() if k != "__name__"}
    return "{" + ", ".join(f'{k}="{v}"' for k, v in shown.items()) + "}" if shown else expr


# ------------------------------------------------------------------- drawing --
BG, PANEL, BORDER, TEXT, DIM = "#111217", "#181b1f", "#2c3036", "#ccccdc", "#9fa0ad"
NAMED = {"green": "#73BF69", "yellow": "#FADE2A", "orange": "#FF9830", "red": "#F2495C", "blue": "#5794F2",
         "purple": "#B877D9", "text": TEXT}
DARKER = {"#73BF69": "#37872D", "#F2495C": "#C4162A", "#FF9830": "#FA6400", "#FADE2A": "#E0B400"}  # stat backgrounds
PALETTE = ["#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C", "#5794F2", "#B877D9", "#705DA0", "#37872D"]


def fmt(v: float, unit: str, decimals=None) -> str:
    if math.isnan(v):
        return "No data"
    if v == 0 and unit in ("s", "ms"):
        return f"0 {unit}"
    if unit == "percentunit":
        return f"{v * 100:.{1 if decimals is None else decimals}f}%"
    if unit in ("s", "ms"):
        s = v if unit == "s" else v / 1000
        for limit, div, name in ((1e-3, 1e-6, "µs"), (1, 1e-3, "ms"), (60, 1, "s")):
            if abs(s) < limit:
                return f"{s / div:.3g} {name}"
        return f"{s / 60:.3g} min"
    text = f"{v:.{decimals}f}" if decimals is not None else f"{v:.3g}"
    return text + {"reqps": " req/s", "ops": " ops/s"}.get(unit, "")


def style(panel: dict, name: str, index: int) -> dict:
    custom = panel.get("fieldConfig", {}).get("defaults", {}).get("custom", {})
    st = {"color": PALETTE[index % len(PALETTE)], "fill": custom.get("fillOpacity", 0) / 100,
          "lw": custom.get("lineWidth", 1) + 0.3, "ls": "-"}
    for o in panel.get("fieldConfig", {}).get("overrides", []):
        m = o.get("matcher", {})
        if not (m.get("id") == "byName" and m.get("options") == name
                or m.get("id") == "byRegexp" and re.search(m.get("options", "$^"), name)):
            continue
        for prop in o.get("properties", []):
            value = prop.get("value")
            if prop["id"] == "color":
                st["color"] = NAMED.get(value.get("fixedColor"), value.get("fixedColor", st["color"]))
            elif prop["id"] == "custom.fillOpacity":
                st["fill"] = value / 100
            elif prop["id"] == "custom.lineStyle" and value.get("fill") == "dash":
                st["ls"] = (0, (4, 3))
    return st


def stat_colour(panel: dict, v: float):
    """Colour and mapped text of a stat value: value mappings, then thresholds."""
    d = panel.get("fieldConfig", {}).get("defaults", {})
    for m in d.get("mappings", []):
        hit = m.get("options", {}).get(f"{v:g}") if m.get("type") == "value" else None
        if hit:
            return NAMED.get(hit.get("color"), DIM), hit.get("text")
    colour = DIM
    for s in d.get("thresholds", {}).get("steps", []):
        if s.get("value") is None or v >= s["value"]:
            colour = NAMED.get(s["color"], s["color"])
    return colour, None


def reduce(panel: dict, ys: list) -> float:
    calc = (panel.get("options", {}).get("reduceOptions", {}).get("calcs") or ["lastNotNull"])[0]
    seen = [y for y in ys if not math.isnan(y)] or [math.nan]
    calcs = {"mean": sum(seen) / len(seen), "max": max(seen), "min": min(seen)}
    return calcs.get(calc, seen[-1])  # lastNotNull, and the rest


def draw_stat(fig, rect, panel: dict, xs: list, ys: list):
    """The reduced value on its threshold's colour, over a sparkline."""
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    v = reduce(panel, ys)
    colour, text = stat_colour(panel, v)
    ax = fig.add_axes(rect, facecolor=DARKER.get(colour, colour), xticks=[], yticks=[])
    if panel.get("options", {}).get("graphMode") == "area":
        ax.fill_between(xs, ys, min((y for y in ys if not math.isnan(y)), default=0), color="white", alpha=0.2, lw=0)
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi + (hi - lo) * 1.2)
    ax.set_xlim(xs[0], xs[-1])
    ax.text(0.5, 0.6, text or fmt(v, defaults.get("unit", "short"), defaults.get("decimals")), transform=ax.transAxes,
            ha="center", va="center", fontsize=20, weight="bold", color="white")


def draw_lines(fig, box, panel: dict, xs: list, series: list, x: float, y: float, w: float, h: float):
    """A time series panel: lines with their legend below, axes as the panel's field config says."""
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    unit, decimals = defaults.get("unit", "short"), defaults.get("decimals")
    longest = max((len(name) for name, _ in series), default=1)
    ncol = max(1, min(len(series), int((w - 16) // (5.3 * longest + 30))))
    legend_h = 13 * math.ceil(len(series) / ncol)
    plot_w, plot_h = w - 56, h - 44 - legend_h
    ax = fig.add_axes(box(x + 46, y + 24, plot_w, plot_h), facecolor=PANEL)
    for i, (name, ys) in enumerate(series):
        st = style(panel, name, i)
        ax.plot(xs, ys, color=st["color"], lw=st["lw"], ls=st["ls"], label=name)
        if st["fill"]:
            ax.fill_between(xs, ys, 0, color=st["color"], alpha=st["fill"], lw=0)
    seen = [v for _, ys in series for v in ys if not math.isnan(v)] or [0]
    soft = defaults.get("custom", {}).get("axisSoftMin")
    low = defaults.get("min", None if soft is None else min(soft, min(seen)))
    high = defaults.get("max", low + 1 if low is not None and max(seen) <= low else None)
    ax.set_ylim(bottom=low, top=high)
    ax.set_xlim(xs[0], xs[-1])
    ax.yaxis.set_major_locator(MaxNLocator(nbins=max(2, int(h // 45)), integer=decimals == 0))
    ax.yaxis.set_major_formatter(lambda v, _: fmt(v, unit, decimals))
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(maxticks=max(3, int(w // 90))))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=timezone.utc))
    ax.grid(color=BORDER, lw=0.6)
    ax.tick_params(colors=DIM, labelsize=7, length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.legend(loc="upper left", bbox_to_anchor=(-40 / plot_w, -18 / plot_h), ncol=ncol, frameon=False, fontsize=7,
              handlelength=1, borderaxespad=0, labelspacing=0.3, columnspacing=1.2)


def draw(dash: dict, results: dict, start: float, end: float, out: str, width: int):
    """The panels where the dashboard's gridPos puts them (24 columns, 30 px rows)."""
    step = max(SCRAPE_S, math.ceil((end - start) / MAX_POINTS))
    stamps = list(range(math.ceil(start), math.floor(end) + 1, step))
    xs = [datetime.fromtimestamp(t, timezone.utc) for t in stamps]
    pad, top, unit_h, gap = 12, 40, 38, 8  # pixels; a grid unit is 30 px plus the gap
    panels = panels_of(dash)
    height = top + max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels) * unit_h + pad
    col = (width - 2 * pad + gap) / 24
    plt.rcParams.update({"font.size": 7.5, "text.color": TEXT, "axes.edgecolor": BORDER})
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100, facecolor=BG)

    def box(x, y, w, h):  # pixels from the top left -> figure fractions
        return [x / width, 1 - (y + h) / height, w / width, h / height]

    heading = f"{dash['title']}    {xs[0]:%Y-%m-%d %H:%M:%S} to {xs[-1]:%H:%M:%S} UTC"
    fig.text(pad / width, 1 - 22 / height, heading, fontsize=12, weight="bold", va="center")
    fig.text(1 - pad / width, 1 - 22 / height, f"every query of the dashboard, evaluated by Prometheus scraping every "
             f"{SCRAPE_S} s", color=DIM, ha="right", va="center")
    for p in panels:
        g = p["gridPos"]
        x, y, w, h = pad + g["x"] * col, top + g["y"] * unit_h, g["w"] * col - gap, g["h"] * unit_h - gap
        if p["type"] == "row":
            fig.text(x / width, 1 - (y + h / 2) / height, "\u25be " + p["title"], fontsize=10.5, weight="bold",
                     va="center")
            continue
        frame = fig.add_axes(box(x, y, w, h), facecolor=PANEL, xticks=[], yticks=[])
        frame.text(8 / w, 1 - 13 / h, p["title"], transform=frame.transAxes, weight="bold", fontsize=8.5, va="center")
        series = [(name, [pts.get(t, math.nan) for t in stamps]) for name, pts in results.get(p["id"], [])]
        if p["type"] == "stat":
            draw_stat(fig, box(x + 1, y + 24, w - 2, h - 25), p, xs, series[0][1])
        else:
            draw_lines(fig, box, p, xs, series, x, y, w, h)
    fig.savefig(out, facecolor=BG)
    plt.close(fig)
    # 256 colours keep the file small.
    Image.open(out).convert("RGB").quantize(colors=256, dither=Image.Dither.NONE).save(out, optimize=True)


# ---------------------------------------------------------------------- main --
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prometheus", required=True, help="the prometheus binary")
    ap.add_argument("--target", action="append", required=True, help="a service's host:port on loopback (repeatable)")
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.add_argument("--dashboard", default=os.path.join(HERE, "synapse-keys-worker.json"))
    ap.add_argument("--width", type=int, default=1800, help="of the picture, in pixels")
    how_long = ap.add_mutually_exclusive_group(required=True)
    how_long.add_argument("--seconds", type=float, help="record for this long")
    how_long.add_argument("--until-eof", action="store_true", help="record until standard input is closed")
    args = ap.parse_args()
    for t in args.target:
        if urllib.parse.urlsplit(f"//{t}").hostname not in ("127.0.0.1", "localhost", "::1"):
            ap.error(f"--target {t}: only loopback targets")
    with open(args.dashboard) as f:
        dash = json.load(f)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops Prometheus

    with tempfile.TemporaryDirectory(prefix="skw-prometheus-") as workdir:
        proc, url, log = start_prometheus(args.prometheus, args.target, workdir)
        try:
            def ready():
                if proc.poll() is not None:
                    raise SystemExit(f"prometheus exited ({proc.returncode}):\n{open(log).read()[-3000:]}")
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as answer:
                    return answer.status == 200

            poll("prometheus ready", 60, ready)
            start = poll(f"a scrape of {', '.join(args.target)}", 30, lambda: scraped_after(url, args.target, 0))
            version = api(url, "/api/v1/status/buildinfo")["version"]
            print(f"recording: prometheus {version} on {url} scraping {', '.join(args.target)}", flush=True)
            if args.until_eof:
                sys.stdin.read()
            else:
                time.sleep(args.seconds)  # the length of the recording, not a wait for anything
            end = time.time()
            poll("a scrape after the end of the recording", 30, lambda: scraped_after(url, args.target, end))
            results = evaluate(dash, url, start, end)
        except Failed as e:
            print(f"render.py: {e}", file=sys.stderr)
            return 1
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    draw(dash, results, start, end, args.out, args.width)
    print(f"wrote {args.out} ({os.path.getsize(args.out) // 1024} KiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
