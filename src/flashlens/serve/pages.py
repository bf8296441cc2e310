"""HTML for each viewer page, rendered from the same dict as its JSON twin.

Plain strings, no template engine. Every piece of text that came from the atlas or the user
goes through `esc` (tokens contain <, >, &, quotes); token cells go through `token_cell`, which
also makes whitespace visible (" dog" -> "␣dog").
"""

from __future__ import annotations

import html
import math
from typing import Any
from urllib.parse import urlencode

from ..atlas import format_layers
from ..atlas.atlas import is_degenerate
from ..atlas.tokens import readable
from ..atlas.validation import ratio_text
from .views import neuron_path, token_path

CSS = """
:root { --fg:#1d2330; --muted:#667085; --line:#e4e7ec; --bar:#3b82f6; --neg:#dc6b5c;
        --bg:#fff; --soft:#f5f7fa; --link:#1d4ed8; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
       color:var(--fg); background:var(--bg); }
a { color:var(--link); text-decoration:none; } a:hover { text-decoration:underline; }
header { display:flex; gap:1.2rem; align-items:center; padding:.6rem 1.5rem;
         border-bottom:1px solid var(--line); background:var(--soft); flex-wrap:wrap; }
header .brand { font-weight:700; color:var(--fg); }
header .model { color:var(--muted); font-family:ui-monospace, monospace; font-size:13px; }
header form { margin-left:auto; display:flex; gap:.4rem; min-width:0; max-width:100%; }
input, select, button { font:inherit; padding:.3rem .5rem; border:1px solid #cfd4dc;
                        border-radius:6px; background:#fff; }
input[type=search] { width:20rem; min-width:0; flex:1 1 auto; }
button { background:var(--fg); color:#fff; border-color:var(--fg); cursor:pointer; }
main { padding:1rem 1.5rem 3rem; max-width:72rem; }
h1 { font-size:1.5rem; margin:.4rem 0 .2rem; overflow-wrap:anywhere; }
h2 { font-size:1.1rem; margin:1.6rem 0 .5rem; }
.sub { color:var(--muted); margin:0 0 1rem; }
.note { color:#8a5a00; margin:0 0 1rem; }
.nav { display:flex; gap:1rem; margin:.3rem 0 1rem; flex-wrap:wrap; }
.nav .off { color:#b0b6c0; }
table { border-collapse:collapse; font-size:14px; }
th, td { padding:.25rem .7rem; border-bottom:1px solid var(--line); text-align:left;
         vertical-align:middle; }
th { color:var(--muted); font-weight:600; font-size:12px; text-transform:uppercase; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
.tok { font-family:ui-monospace, "SFMono-Regular", Menlo, monospace; white-space:pre;
       unicode-bidi:isolate;
       background:var(--soft); border:1px solid var(--line); border-radius:4px;
       padding:0 .3rem; }
.tok .ws { color:#98a2b3; }
.tok.byte { font-style:italic; color:var(--muted); }
.bar { width:12rem; height:.8rem; background:var(--soft); border-radius:3px; overflow:hidden; }
.bar span { display:block; height:100%; background:var(--bar); }
.grid { display:flex; gap:2.5rem; flex-wrap:wrap; align-items:flex-start; }
dl.kv { display:grid; grid-template-columns:max-content auto; gap:.15rem 1.2rem; margin:0; }
dl.kv dt { color:var(--muted); } dl.kv dd { margin:0; font-variant-numeric:tabular-nums;
                                 overflow-wrap:anywhere; }
.notes { color:#8a5a00; background:#fff8e6; border:1px solid #f5e2b3; border-radius:6px;
         padding:.4rem .8rem; margin:.6rem 0; }
.notes p { margin:.2rem 0; }
.notes, .error, h1, h2 { overflow-wrap:anywhere; }
.error { color:#912018; background:#fef3f2; border:1px solid #fecdca; border-radius:6px;
         padding:.6rem .9rem; }
.tokens .tok { margin-right:.25rem; }
form.search-form { display:flex; gap:.5rem; flex-wrap:wrap; align-items:center;
                   margin:.5rem 0 1rem; }
footer { color:var(--muted); font-size:12px; padding:0 1.5rem 1.5rem; }
@media (max-width: 40rem) {
  header, main { padding-left:.7rem; padding-right:.7rem; }
  header form { margin-left:0; width:100%; }
  input[type=search] { width:auto; }
  table { display:block; overflow-x:auto; max-width:100%; }
  .bar { width:5rem; }
}
"""

_WHITESPACE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def esc(value: object) -> str:
    """Text made safe for HTML element content and quoted attributes."""
    return html.escape(str(value), quote=True)


def visible(text: str) -> str:
    """A decoded token with its whitespace and invisible characters made visible: space,
    newline, tab and return as symbols; any other character Python does not print (controls,
    format characters such as bidi overrides and zero-width spaces, other spaces such as
    NBSP) escaped as Python writes it, e.g. \\x01, \\xa0, \\u202b: as the CLI shows them."""
    if text == "":
        return "∅"
    out = []
    for ch in text:
        if ch in _WHITESPACE:
            out.append(_WHITESPACE[ch])
        elif not ch.isprintable():
            out.append(repr(ch)[1:-1])
        else:
            out.append(ch)
    return "".join(out)


def display(text: str, token: str | None = None) -> str:
    """What a token cell shows: the visible text, or for a byte token (decoding to U+FFFD)
    the tokenizer's own form, e.g. <0xE2>."""
    return visible(readable(text, token))


def token_cell(text: str, token: str | None = None, token_id: int | None = None) -> str:
    """A monospace token box; whitespace markers dimmed; links to the token's page."""
    shown = display(text, token)
    extra = " byte" if shown != visible(text) else ""
    inner = "".join(f'<span class="ws">{esc(c)}</span>' if c in "␣↵⇥␍∅" else esc(c) for c in shown)
    title = repr(text) + (f" = {token}" if token is not None and token != text else "")
    if token_id is not None:
        title += f" (id {token_id})"
        href = esc(token_path(token_id))
        return f'<a class="tok{extra}" href="{href}" title="{esc(title)}">{inner}</a>'
    return f'<span class="tok{extra}" title="{esc(title)}">{inner}</span>'


def top_cells(ids: list[int], vocab: dict[str, dict[str, str]]) -> str:
    """A neuron's top tokens (ids, with the page's `vocab`) as a row of token cells."""
    cells = "".join(token_cell(**vocab[str(i)], token_id=i) for i in ids)
    return f'<span class="tokens">{cells}</span>'


def prob(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "n/a"  # (a degenerate neuron's NaN distribution)
    if not math.isfinite(p):
        return str(p)
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def num(x: float | None, digits: int = 2) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:.{digits}f}" if math.isfinite(x) else str(x)


def bar(p: float) -> str:
    width = min(max(p, 0.0), 1.0) * 100 if math.isfinite(p) else 0.0
    return f'<div class="bar" title="{esc(prob(p))}"><span style="width:{width:.1f}%"></span></div>'


def link(href: str | None, label: str) -> str:
    if href is None:
        return f'<span class="off">{esc(label)}</span>'
    return f'<a href="{esc(href)}">{esc(label)}</a>'


def page(title: str, body: str, *, model: str | None = None, q: str = "") -> str:
    """The frame of every page: header with the search box, then `body`."""
    model_html = f'<span class="model">{esc(model)}</span>' if model else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)} · flashlens</title>
<link rel="stylesheet" href="/style.css">
<link rel="icon" href="data:,">
</head>
<body>
<header>
<a class="brand" href="/">flashlens</a>{model_html}
<form action="/search" method="get" role="search">
<input type="search" name="q" value="{esc(q)}" required aria-label="search"
 placeholder="concept (dog) or neuron (up 2:7)">
<button type="submit">Search</button>
</form>
</header>
<main>
{body}
</main>
</body>
</html>
"""


def table(head: list[str], rows: list[list[str]], num_cols: set[int] | None = None) -> str:
    """An HTML table from already-escaped cells; columns in `num_cols` align right."""
    num_cols = num_cols or set()
    cls = [' class="num"' if i in num_cols else "" for i in range(len(head))]
    ths = "".join(f"<th{c}>{esc(h)}</th>" for c, h in zip(cls, head, strict=True))
    trs = "".join(
        "<tr>" + "".join(f"<td{c}>{v}</td>" for c, v in zip(cls, row, strict=True)) + "</tr>\n"
        for row in rows
    )
    return f"<table>\n<thead><tr>{ths}</tr></thead>\n<tbody>\n{trs}</tbody>\n</table>"


def _degenerate_note(w_norm: float | None) -> str:
    """A note above a neuron whose weight vector is all zero or not finite (a JSON null |w|:
    a non-finite one)."""
    if w_norm is not None and not is_degenerate(w_norm):
        return ""
    return (
        '<p class="note">This neuron\'s weight vector is all zero or not finite: its tokens '
        "are meaningless (a pruned or damaged checkpoint?).</p>\n"
    )


# Whether a causal check (validation.parquet) validated a neuron; blank: never checked.
_MARKS = {None: "", True: "✓ yes", False: "✗ no"}


def kv(pairs: list[tuple[str, str]]) -> str:
    return '<dl class="kv">' + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


def label(matrix: str, layer: int, index: int) -> str:
    return f"{matrix} {layer}:{index}"


# --- pages -----------------------------------------------------------------------------------
def _widths(m: dict[str, Any]) -> str:
    """Neurons per layer: one figure, or each distinct width with its layers."""
    if not m.get("widths"):
        return f"{m['d_mlp']:,} neurons per layer"
    by: dict[int, list[int]] = {}
    for layer, w in enumerate(m["widths"]):
        by.setdefault(w, []).append(layer)
    parts = [f"{w:,} in layers {format_layers(layers)}" for w, layers in by.items()]
    return esc("neurons per layer: " + "; ".join(parts))


def overview_page(data: dict[str, Any]) -> str:
    m = data["meta"]
    shape = [
        ("architecture", esc(m["architecture"])),
        ("family", esc(m["family"])),
        ("d_model", f"{m['d_model']:,}"),
        ("d_mlp", _widths(m)),
        ("layers", f"{esc(format_layers(m['layers']))} of {m['n_layers']}"),
        ("d_vocab", f"{m['d_vocab']:,}"),
        ("matrices", esc(", ".join(m["matrices"]))),
    ]
    settings = [
        (k, esc(m[k]))
        for k in (
            "norm",
            "top_k",
            "reverse_n",
            "weight_dtype",
            "quantization",
            "compute_dtype",
            "config_hash",
            "weights_fingerprint",
            "flashlens_version",
            "created",
            "format_version",
        )
        if m.get(k) is not None  # (weights_fingerprint: not in atlases made before it)
    ]
    if m.get("decoding"):  # (not in atlases made before it)
        cap = m["decoding"]["logit_softcap"]
        settings.append(("norm eps", f"{m['decoding']['norm_eps']:g}"))
        settings.append(("logit soft-cap", "none" if cap is None else f"{cap:g}"))
        settings.append(("tied head", "yes" if m["decoding"]["tied"] else "no"))
        if "norm_kind" in m["decoding"]:
            settings.append(("final norm", m["decoding"]["norm_kind"]))
        if m["decoding"].get("logit_bias"):
            settings.append(("head bias", "yes"))
        if "logit_scale" in m["decoding"]:
            settings.append(("logit scale", f"{m['decoding']['logit_scale']:g}"))
    if m.get("seconds") is not None:
        settings.append(("mapped in", f"{m['seconds']:.1f} s"))
    links = data["links"]["neurons"]
    rows = [
        [f"layer {esc(layer)}"]
        + [link(links[mat].get(layer), f"{mat} {layer}:0") for mat in m["matrices"]]
        for layer in (str(x) for x in m["layers"])
    ]
    widths = m.get("widths") or [m["d_mlp"]] * m["n_layers"]
    n = sum(widths[layer] for layer in m["layers"]) * len(m["matrices"])
    body = f"""<h1>{esc(m["model"])}</h1>
<p class="sub">{n:,} neurons decoded through the model's final norm and LM-head.
Search a concept, or type a neuron address like <code>up 2:7</code>.</p>
<div class="grid">
<section><h2>Shape</h2>{kv(shape)}</section>
<section><h2>Settings</h2>{kv(settings)}</section>
</div>
<h2>Neurons</h2>
{table(["layer", *m["matrices"]], rows)}"""
    return page(m["model"], body, model=m["model"])


def neuron_page(data: dict[str, Any]) -> str:
    d = data
    name = label(d["matrix"], d["layer"], d["index"])
    links = d["links"]
    others = " ".join(
        link(None if mat == d["matrix"] else href, mat) for mat, href in links["matrices"].items()
    )
    nav = (
        f'<div class="nav">{link(links["prev"], "← previous")}'
        f"{link(links['next'], 'next →')}<span>matrix: {others}</span></div>"
    )
    where = [("expert", f"{d['expert']} (unit {d['unit']})")] if "expert" in d else []
    stats = kv(
        [
            *where,
            ("entropy", f"{num(d['entropy'], 3)} nats"),
            ("logsumexp", num(d["logsumexp"], 3)),
            ("‖w‖", num(d["w_norm"], 4)),
            ("logit mean", num(d["logit_mean"], 3)),
            ("logit std", num(d["logit_std"], 3)),
            ("logit skew", num(d["logit_skew"], 3)),
            ("logit kurtosis", num(d["logit_kurtosis"], 3)),
        ]
    )
    top = table(
        ["#", "token", "probability", "", "logit"],
        [
            [
                str(i),
                token_cell(t["text"], t["token"], t["token_id"]),
                bar(t["prob"]),
                prob(t["prob"]),
                num(t["logit"]),
            ]
            for i, t in enumerate(d["top"], 1)
        ],
        num_cols={0, 3, 4},
    )
    bottom = table(
        ["#", "token", "probability", "logit"],
        [
            [
                str(i),
                token_cell(t["text"], t["token"], t["token_id"]),
                prob(t["prob"]),
                num(t["logit"]),
            ]
            for i, t in enumerate(d["bottom"], 1)
        ],
        num_cols={0, 2, 3},
    )
    body = f"""<h1>Neuron {esc(name)}</h1>
<p class="sub">What this {esc(d["matrix"])} neuron writes, read through the LM-head:
softmax(W_U · final_norm(w)).</p>
{_degenerate_note(d["w_norm"])}{nav}
<div class="grid">
<section><h2>Top tokens (promoted)</h2>{top}</section>
<section><h2>Moments</h2>{stats}</section>
</div>
<h2>Bottom tokens (suppressed)</h2>
{bottom}
{_validation_section(d)}"""
    return page(name, body, model=d["model"])


_CHECK_COLUMNS = [
    "concept",
    "validated",
    "ratio",
    "P before",
    "P after",
    "best clamp",
    "prompts",
    "model",
]


def _validation_section(d: dict[str, Any]) -> str:
    """What `flashlens validate` recorded for a neuron page's neuron, or how to check it."""
    checks = d["validations"]
    if not checks:
        example = f"flashlens validate ATLAS CONCEPT --model MODEL --neurons {d['matrix']}:"
        return (
            '<h2>Causal checks</h2>\n<p class="sub">Not validated yet: clamp it on a concept '
            f"with <code>{esc(example)}{d['layer']}:{d['index']}</code>.</p>"
        )
    rows = []
    for c in checks:
        search = "/search?" + urlencode({"q": c["concept"], "matrix": d["matrix"]})
        asked = "" if c["factor"] is None else f" (≥ {c['factor']:g}×)"
        rows.append(
            [
                link(search, c["concept"]),
                _MARKS[c["validated"]] + esc(asked),
                "n/a" if c["ratio"] is None else ratio_text(c["ratio"]),
                prob(c["baseline_prob"]),
                prob(c["clamped_prob"]),
                esc(f"{c['mode'] or '?'} {c['best_value']:.3g}"),
                "?" if c["n_prompts"] is None else str(c["n_prompts"]),
                esc(c["model"]),
            ]
        )
    return f"""<h2>Causal checks</h2>
<p class="sub">Recorded by <code>flashlens validate</code>: the neuron clamped alone; P is the
concept's next-token probability, mean over the prompts, before and at the best clamp.</p>
{table(_CHECK_COLUMNS, rows, num_cols={2, 3, 4, 6})}"""


def token_page(data: dict[str, Any], model: str) -> str:
    d = data
    rows = [
        [
            str(n["rank"] + 1),
            f'<a href="{esc(neuron_path(n["matrix"], n["layer"], n["index"]))}">'
            f"{esc(label(n['matrix'], n['layer'], n['index']))}</a>",
            bar(n["prob"]),
            prob(n["prob"]),
            num(n["logit"]),
            top_cells(n["top_token_ids"], d["vocab"]),
            _MARKS[n["validated"]],
        ]
        for n in d["neurons"]
    ]
    head = ["#", "neuron", "probability", "", "logit", "its top tokens"]
    head.append(f"validated: {d['concept']}" if d["concept"] else "validated")
    neurons = (
        table(head, rows, num_cols={0, 3, 4})
        if rows
        else '<p class="notes">No neuron stores this token.</p>'
    )
    body = f"""<h1>Token {token_cell(d["text"], d["token"])} <small>id {d["token_id"]}</small></h1>
<p class="sub">Tokenizer form <code>{esc(d["token"])}</code>,
text <code>{esc(repr(d["text"]))}</code>.
The {len(d["neurons"])} neurons (of the {d["reverse_n"]} kept per token) that give it the most
probability, across all layers and matrices.</p>
{neurons}"""
    return page(f"token {d['token_id']}", body, model=model)


def search_page(data: dict[str, Any], model: str, matrices: list[str]) -> str:
    d, q = data, data["query"]
    options = "".join(
        f'<option value="{esc(m)}"{" selected" if q["matrix"] == m else ""}>{esc(m)}</option>'
        for m in ["", *matrices]
    ).replace('<option value="">', '<option value="">all matrices', 1)
    checked = {k: " checked" if q[k] else "" for k in ("top1", "plural")}
    form = f"""<form class="search-form" action="/search" method="get">
<input type="search" name="q" value="{esc(q["q"])}" required aria-label="concept">
<select name="matrix" aria-label="matrix">{options}</select>
<input name="layers" value="{esc(q["layers"] or "")}" placeholder="layers, e.g. 0-5,9"
 aria-label="layers" size="14">
<input name="limit" value="{q["limit"]}" aria-label="limit" size="4">
<label><input type="checkbox" name="top1" value="1"{checked["top1"]}> top-1 only</label>
<label><input type="checkbox" name="plural" value="1"{checked["plural"]}> plurals</label>
<button type="submit">Search</button>
</form>"""
    variants = " ".join(token_cell(v["text"], v["token"], v["token_id"]) for v in d["variants"])
    notes = "".join(f"<p>{esc(n)}</p>" for n in d["notes"])
    notes_html = f'<div class="notes">{notes}</div>' if notes else ""
    rows = []
    for h in d["hits"]:
        rank = "—" if h["concept_rank"] is None else str(h["concept_rank"])
        valid = _MARKS[h["validated"]]
        rows.append(
            [
                f'<a href="{esc(neuron_path(h["matrix"], h["layer"], h["index"]))}">'
                f"{esc(label(h['matrix'], h['layer'], h['index']))}</a>",
                bar(h["concept_prob"]),
                ("≥ " if h["lower_bound"] else "") + prob(h["concept_prob"]),
                rank,
                top_cells(h["top_token_ids"], d["vocab"]),
                valid,
            ]
        )
    head = ["neuron", "concept probability", "", "rank", "top tokens", "validated"]
    hits = table(head, rows, num_cols={2, 3}) if rows else ""
    body = f"""<h1>Neurons for “{esc(d["concept"])}”</h1>
{form}
<p class="sub">Variants searched: {variants}</p>
{notes_html}
{hits}"""
    return page(f"search {d['concept']}", body, model=model, q=q["q"])


def error_page(status: int, message: str, model: str | None, q: str = "") -> str:
    body = f"""<h1>{status}: {esc(_REASONS.get(status, "error"))}</h1>
<p class="error">{esc(message)}</p>
<p><a href="/">Back to the atlas overview</a></p>"""
    return page(f"{status} {_REASONS.get(status, 'error')}", body, model=model, q=q)


_REASONS = {400: "bad request", 404: "not found", 405: "method not allowed", 500: "server error"}
