"""The web viewer in-process: every page against its JSON twin and against the atlas itself."""

from __future__ import annotations

import json
import math
import socket
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

from flashlens.atlas import Atlas
from flashlens.atlas.tokens import readable
from flashlens.cli import main
from flashlens.serve import ServeError, bind, make_app
from flashlens.serve.pages import display, visible

# Tags the viewer writes; a token or query that leaked unescaped would add others (<s>, <script>).
ALLOWED_TAGS = {
    "html", "head", "meta", "title", "link", "body", "header", "form", "input", "button", "main",
    "h1", "h2", "p", "div", "section", "span", "a", "table", "thead", "tbody", "tr", "th", "td",
    "dl", "dt", "dd", "code", "small", "select", "option", "label",
}  # fmt: skip


class Page(HTMLParser):
    """Tags, text, links and token cells of a rendered page."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.links: list[str] = []
        self.tokens: list[str] = []  # visible text of each .tok cell, in page order
        self.titles: list[str] = []  # title attribute of each .tok cell
        self.classes: list[str] = []  # class attribute of each .tok cell
        self.text: list[str] = []
        self._tok_depth = 0
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        a = dict(attrs)
        if tag == "a" and a.get("href"):
            self.links.append(str(a["href"]))
        if self._tok_depth:
            self._tok_depth += 1
        elif "tok" in (a.get("class") or "").split():
            self._tok_depth = 1
            self.tokens.append("")
            self.titles.append(a.get("title") or "")
            self.classes.append(a.get("class") or "")

    def handle_endtag(self, tag: str) -> None:
        if self._tok_depth:
            self._tok_depth -= 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._tok_depth:
            self.tokens[-1] += data


@pytest.fixture(scope="module")
def atlas(stories_atlas: Path) -> Atlas:
    return Atlas.open(stories_atlas)


@pytest.fixture(scope="module")
def client(atlas: Atlas) -> TestClient:
    return TestClient(make_app(atlas))


def get_both(client: TestClient, path: str) -> tuple[Page, dict[str, Any]]:
    """The page and its JSON twin; both twin spellings must agree."""
    html = client.get(path)
    assert html.status_code == 200, html.text
    assert html.headers["content-type"].startswith("text/html")
    route, _, query = path.partition("?")
    suffixed = client.get(
        f"{'/index' if route == '/' else route}.json" + (f"?{query}" * bool(query))
    )
    flagged = client.get(path + ("&" if query else "?") + "format=json")
    assert suffixed.status_code == flagged.status_code == 200
    assert suffixed.headers["content-type"] == "application/json"
    assert suffixed.json() == flagged.json()
    page = Page(html.text)
    assert page.tags <= ALLOWED_TAGS, page.tags - ALLOWED_TAGS
    assert "/search" in html.text and 'name="q"' in html.text  # the search box is on every page
    return page, suffixed.json()


def shown_prob(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


# --- overview --------------------------------------------------------------------------------
def test_overview_shows_the_atlas_meta(client: TestClient, atlas: Atlas) -> None:
    page, data = get_both(client, "/")
    assert data["meta"] == atlas.meta.to_dict()
    assert client.get("/.json").json() == data
    text = " ".join(page.text)
    m = atlas.meta
    for value in (m.model, m.architecture, m.norm, m.config_hash, f"{m.d_mlp}", f"{m.d_vocab}"):
        assert value in text
    assert m.decoding is not None and m.decoding["logit_softcap"] is None  # (a Llama)
    assert f"norm eps {m.decoding['norm_eps']:g}" in text and "logit soft-cap none" in text
    expected = {f"/neuron/{mat}/{layer}/0" for mat in m.matrices for layer in m.layers}
    assert expected <= set(page.links)


def test_every_link_on_the_main_pages_resolves(client: TestClient) -> None:
    seen: set[str] = set()
    for start in ("/", "/neuron/gate/1/0", "/token/400", "/search?q=dog"):
        page, _ = get_both(client, start)
        for href in page.links:
            if href.startswith("/") and href not in seen:
                seen.add(href)
                assert client.get(href).status_code == 200, href
    assert len(seen) > 30


# --- neuron ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("matrix", "layer", "index"), [("up", 2, 7), ("gate", 0, 171), ("down", 4, 0), ("down", 4, 144)]
)
def test_neuron_page_matches_the_atlas(
    client: TestClient, atlas: Atlas, matrix: str, layer: int, index: int
) -> None:
    page, data = get_both(client, f"/neuron/{matrix}/{layer}/{index}")
    rec = atlas.neuron(layer, index, matrix)
    assert {k: data[k] for k in rec.to_dict()} == rec.to_dict()
    # the probabilities really are softmax(logits) under the stored logsumexp, most promoted first
    probs = [t["prob"] for t in data["top"]]
    assert probs == sorted(probs, reverse=True)
    for t in data["top"] + data["bottom"]:
        assert t["prob"] == pytest.approx(math.exp(t["logit"] - data["logsumexp"]), rel=1e-6)
    # the HTML shows the same tokens in the same order, whitespace made visible
    expected = [display(t.text, t.token) for t in rec.top + rec.bottom]
    assert page.tokens == expected
    text = page.text
    for t in rec.top:
        assert shown_prob(t.prob) in text
    assert f"{rec.entropy:.3f} nats" in text
    assert f"{rec.logsumexp:.3f}" in text
    for t in rec.top + rec.bottom:
        assert f"/token/{t.token_id}" in page.links


def test_neuron_neighbours_cross_layers(client: TestClient, atlas: Atlas) -> None:
    d_mlp, layers = atlas.meta.d_mlp, atlas.meta.layers
    links = client.get("/neuron/up/1/0.json").json()["links"]
    assert links["prev"] == f"/neuron/up/0/{d_mlp - 1}"
    assert links["next"] == "/neuron/up/1/1"
    assert client.get(f"/neuron/up/1/{d_mlp - 1}.json").json()["links"]["next"] == "/neuron/up/2/0"
    assert client.get("/neuron/down/0/0.json").json()["links"]["prev"] is None
    last = f"/neuron/down/{layers[-1]}/{d_mlp - 1}.json"
    assert client.get(last).json()["links"]["next"] is None
    assert client.get("/neuron/gate/3/5.json").json()["links"]["matrices"] == {
        m: f"/neuron/{m}/3/5" for m in atlas.meta.matrices
    }


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/neuron/up/2/172", "neuron index 172 is out of range: layers have 172 neurons (0-171)"),
        ("/neuron/up/9/0", "layer 9 is not in this atlas; it has layers 0-4"),
        ("/neuron/mlp/2/7", "matrix 'mlp' is not in this atlas; it has up, gate, down"),
        ("/neuron/up/two/7", "layer 'two' is not a whole number"),
        ("/neuron/up/2/-1", "neuron index -1 is negative"),
        # one address per page: no other spelling of a number (int() reads all of these)
        ("/neuron/up/2/3_0", "neuron index '3_0' is not a whole number"),
        ("/neuron/up/2/+3", "neuron index '+3' is not a whole number"),
        ("/neuron/up/02x/3", "layer '02x' is not a whole number"),
        ("/token/\u0663", "token id '\u0663' is not a whole number"),
        ("/token/512", "token id 512 is out of range: the vocabulary has 512 tokens (0-511)"),
        ("/nothing/here", "no page at /nothing/here"),
    ],
)
def test_bad_addresses_are_404_with_the_reason(client: TestClient, path: str, message: str) -> None:
    html = client.get(path)
    assert html.status_code == 404
    assert message in " ".join(Page(html.text).text)
    assert 'name="q"' in html.text  # the search box is there to recover
    for twin in (client.get(path + ".json"), client.get(path + "?format=json")):
        assert twin.status_code == 404
        assert twin.json()["status"] == 404
        assert message in twin.json()["error"]


# --- token -----------------------------------------------------------------------------------
def test_token_page_is_the_reverse_index(client: TestClient, atlas: Atlas) -> None:
    tid = atlas.texts.index(" dog") if " dog" in atlas.texts else 400
    page, data = get_both(client, f"/token/{tid}")
    rows = [r for r in pq.read_table(atlas.reverse_path).to_pylist() if r["token_id"] == tid]
    rows.sort(key=lambda r: r["rank"])
    assert len(rows) == atlas.meta.reverse_n
    assert (data["token_id"], data["token"], data["text"]) == (
        tid,
        atlas.tokens[tid],
        atlas.texts[tid],
    )
    got = [
        {k: n[k] for k in ("rank", "layer", "matrix", "index", "prob", "logit")}
        for n in data["neurons"]
    ]
    assert got == [{k: r[k] for k in got[0]} for r in rows]
    for n in data["neurons"]:
        rec = atlas.neuron(n["layer"], n["index"], n["matrix"])
        assert n["top_tokens"] == [readable(t.text, t.token) for t in rec.top[:5]]
        assert n["top_token_ids"] == [t.token_id for t in rec.top[:5]]
        if tid in [t.token_id for t in rec.top]:  # the two tables agree where both store it
            stored = next(t for t in rec.top if t.token_id == tid)
            assert n["prob"] == pytest.approx(stored.prob, rel=1e-5)
    neuron_links = [h for h in page.links if h.startswith("/neuron/")]
    assert neuron_links == [f"/neuron/{r['matrix']}/{r['layer']}/{r['index']}" for r in rows]


def test_byte_tokens_on_the_token_page_read_in_their_own_form(
    client: TestClient, atlas: Atlas
) -> None:
    """Token 239 is a byte token (<0xEC>, text U+FFFD): the heading, its neurons' top tokens
    and the JSON twin all show the tokenizer form, as the neuron page does."""
    assert (atlas.tokens[239], atlas.texts[239]) == ("<0xEC>", "\ufffd")
    page, data = get_both(client, "/token/239")
    assert page.tokens[0] == "<0xEC>" and "byte" in page.classes[0].split()
    ids = [i for n in data["neurons"] for i in n["top_token_ids"]]
    assert any("\ufffd" in atlas.texts[i] for i in ids)  # the test is not vacuous
    for n in data["neurons"]:
        assert n["top_tokens"] == [
            readable(atlas.texts[i], atlas.tokens[i]) for i in n["top_token_ids"]
        ]
        assert "\ufffd" not in "".join(n["top_tokens"])
    cells = list(zip(page.tokens[1:], page.classes[1:], strict=True))
    assert cells == [
        (
            display(atlas.texts[i], atlas.tokens[i]),
            "tok byte" if "\ufffd" in atlas.texts[i] else "tok",
        )
        for i in ids
    ]
    assert {f"/token/{i}" for i in ids} <= set(page.links)


# --- search ----------------------------------------------------------------------------------
def test_search_page_is_atlas_search(client: TestClient, atlas: Atlas) -> None:
    page, data = get_both(client, "/search?q=the&matrix=up&layers=1-3&limit=7&plural=1")
    expected = atlas.search("the", matrix="up", layers=[1, 2, 3], limit=7, plural=True).to_dict()
    assert {k: data[k] for k in expected} == expected
    assert data["query"] == {
        "q": "the",
        "matrix": "up",
        "layers": "1-3",
        "limit": 7,
        "top1": False,
        "plural": True,
    }
    assert 0 < len(data["hits"]) <= 7
    assert all(h["matrix"] == "up" and 1 <= h["layer"] <= 3 for h in data["hits"])
    hits = [h for h in page.links if h.startswith("/neuron/")]
    assert hits == [f"/neuron/up/{h['layer']}/{h['index']}" for h in data["hits"]]
    for v in data["variants"]:
        assert f"/token/{v['token_id']}" in page.links


def test_search_page_shows_byte_tokens_as_the_neuron_page(client: TestClient, atlas: Atlas) -> None:
    """Top tokens of the hits are token cells like the neuron page's: a byte token in italics
    (class byte) with its text and id in the tooltip, linked to its page."""
    page, data = get_both(client, "/search?q=ig&matrix=up&limit=200")
    ids = [i for h in data["hits"] for i in h["top_token_ids"]]
    byte = [i for i in ids if "\ufffd" in atlas.texts[i]]
    assert byte, "up 2:10 of stories260K has byte tokens among its top 5"
    cells = list(zip(page.tokens, page.classes, page.titles, strict=True))[len(data["variants"]) :]
    assert len(cells) == len(ids)
    for i, (shown, cls, title) in zip(ids, cells, strict=True):
        text, token = atlas.texts[i], atlas.tokens[i]
        assert shown == display(text, token) and title.startswith(repr(text))
        assert ("byte" in cls.split()) == (i in byte) and title.endswith(f"(id {i})")
    assert {f"/token/{i}" for i in byte} <= set(page.links)


def test_search_top1_and_notes(client: TestClient, atlas: Atlas) -> None:
    page, data = get_both(client, "/search?q=dog&top1=1")
    expected = atlas.search("dog", top1=True).to_dict()
    assert {k: data[k] for k in expected} == expected
    text = " ".join(page.text)
    for note in data["notes"]:
        assert note in text


def test_a_neuron_address_in_the_search_box_jumps_to_it(client: TestClient) -> None:
    for q, target in [
        ("up 2:7", "/neuron/up/2/7"),
        ("gate/3:10", "/neuron/gate/3/10"),
        ("4:5", "/neuron/up/4/5"),
    ]:
        r = client.get("/search", params={"q": q}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == target
        r = client.get("/search.json", params={"q": q}, follow_redirects=False)
        assert r.headers["location"] == target + ".json"
    # Without a matrix in the text, the form's matrix; a word that is no matrix is a concept.
    r = client.get("/search", params={"q": "1:5", "matrix": "gate"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/neuron/gate/1/5"
    r = client.get("/search", params={"q": "Up 1:5"}, follow_redirects=False)  # auto-capitalised
    assert r.status_code == 303 and r.headers["location"] == "/neuron/up/1/5"
    for path in ("/search", "/search.json"):  # a word that is no matrix: said, query kept
        r = client.get(path, params={"q": "mlp 1:5"}, follow_redirects=False)
        assert r.status_code == 400
        text = r.json()["error"] if path.endswith(".json") else " ".join(Page(r.text).text)
        assert "'mlp 1:5' reads as a neuron address, but 'mlp' is no matrix of this atlas" in text
        assert "it has up, gate, down (e.g. up 1:5)" in text
    assert 'value="mlp 1:5"' in client.get("/search", params={"q": "mlp 1:5"}).text


def test_pages_answer_head_requests(client: TestClient) -> None:
    """Link checkers ask HEAD: every page answers it as it answers GET."""
    for path in ("/", "/neuron/up/2/7", "/token/5", "/search?q=the", "/style.css"):
        head, get = client.head(path), client.get(path)
        assert head.status_code == get.status_code == 200, path
        assert head.headers["content-type"] == get.headers["content-type"], path
    assert client.head("/neuron/up/2/999").status_code == 404


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "the concept is empty"),
        ("q=the&layers=2-9", "layer range '2-9' is out of range"),
        ("q=the&matrix=mlp", "matrix 'mlp' is not in this atlas"),
        ("q=the&limit=many", "limit 'many' is not a whole number"),
    ],
)
def test_bad_searches_are_400(client: TestClient, query: str, message: str) -> None:
    html = client.get(f"/search?{query}")
    assert html.status_code == 400
    assert message in " ".join(Page(html.text).text)
    twin = client.get(f"/search.json?{query}")
    assert twin.status_code == 400 and message in twin.json()["error"]


def test_a_limit_below_one_is_400_without_a_cli_flag_name(client: TestClient) -> None:
    for path in ("/search.json?q=the&limit=0", "/search?q=the&limit=0"):
        r = client.get(path)
        text = r.json()["error"] if path.startswith("/search.json") else " ".join(Page(r.text).text)
        assert r.status_code == 400 and "limit must be at least 1" in text
        assert "--limit" not in text


def test_layers_in_a_search_follow_the_command_lines_rule(client: TestClient, atlas: Atlas) -> None:
    """A range given to the server searches the atlas's layers inside it, as `search
    --layers` does; a layer past the model's last is a 400, not a server error."""
    last = atlas.meta.layers[-1]
    r = client.get(f"/search.json?q=the&layers=1-{last}&limit=400")
    assert r.status_code == 200
    assert {h["layer"] for h in r.json()["hits"]} <= set(range(1, last + 1))
    same = atlas.search("the", layers=f"1-{last}", limit=400)
    assert [(h["layer"], h["index"]) for h in r.json()["hits"]] == [
        (h.layer, h.index) for h in same.hits
    ]
    bad = client.get(f"/search.json?q=the&layers={atlas.meta.n_layers + 3}")
    assert bad.status_code == 400 and "layer" in bad.json()["error"]


# --- escaping --------------------------------------------------------------------------------
def test_markup_in_tokens_and_queries_is_escaped(client: TestClient, atlas: Atlas) -> None:
    marked = [i for i, t in enumerate(atlas.texts) if set(t) & set("<>&\"'")]
    assert marked, "the vocabulary has tokens with markup characters"
    for tid in marked:
        page, data = get_both(client, f"/token/{tid}")
        assert page.tokens[0] == display(data["text"], data["token"])  # the heading: the token
    # a neuron that shows one of them among its top or bottom tokens
    layer, index = next(
        (r["layer"], r["index"])
        for layer in atlas.meta.layers
        for r in atlas.layer_table("up", layer).to_pylist()
        if set(r["top_ids"] + r["bottom_ids"]) & set(marked)
    )
    page, data = get_both(client, f"/neuron/up/{layer}/{index}")
    shown = data["top"] + data["bottom"]
    assert any(t["token_id"] in marked for t in shown)
    assert len(page.titles) == len(shown)
    for title, t in zip(page.titles, shown, strict=True):
        assert title.startswith(repr(t["text"]))
    evil = '<script>alert("x")</script> & \''
    r = client.get("/search", params={"q": evil})
    assert "<script>" not in r.text
    assert Page(r.text).tags <= ALLOWED_TAGS
    assert 'value="&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;"' in r.text


def test_visible_whitespace() -> None:
    assert visible(" dog") == "␣dog"
    assert visible("\n\n") == "↵↵"
    assert visible("\t x") == "⇥␣x"
    assert visible("") == "∅"
    assert visible("a\x01") == "a\\x01"
    # Invisible characters read as Python (and the CLI) writes them: a bidi override, a
    # zero-width space, a no-break space, a C1 control; printable text is left alone.
    assert visible("\u202bx") == "\\u202bx" and visible("\u200b") == "\\u200b"
    assert visible("\xa0a") == "\\xa0a" and visible("\x80") == "\\x80"
    assert visible("é犬") == "é犬"
    assert display(" dog", "▁dog") == "␣dog"
    assert display("\ufffd", "<0xE2>") == "<0xE2>"  # a byte token shows its own form


# --- the command -----------------------------------------------------------------------------
def test_serve_get_prints_one_response(
    stories_atlas: Path, atlas: Atlas, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", str(stories_atlas), "--get", "/neuron/up/2/7.json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rec = atlas.neuron(2, 7, "up").to_dict()
    assert {k: data[k] for k in rec} == rec
    assert main(["serve", str(stories_atlas), "--get", "/search?q=up%202:7&format=json"]) == 0
    assert json.loads(capsys.readouterr().out)["index"] == 7  # the redirect is followed
    assert main(["serve", str(stories_atlas), "--get", "/"]) == 0
    assert capsys.readouterr().out.startswith("<!doctype html>")
    # A path and query as typed (not percent-encoded) read as a browser would send them.
    for typed, encoded in [
        ("/search.json?q=\u00e9&limit=1", "/search.json?q=%C3%A9&limit=1"),
        ("/token/%31.json", "/token/1.json"),
    ]:
        codes = [main(["serve", str(stories_atlas), "--get", p]) for p in (typed, encoded)]
        outs = capsys.readouterr().out.split("\n}\n")
        assert codes[0] == codes[1] and outs[0] == outs[1], typed
    assert main(["serve", str(stories_atlas), "--get", "/search.json?q=\u00e9"]) in (0, 1)
    assert json.loads(capsys.readouterr().out)["query"]["q"] == "\u00e9"


def test_serve_get_errors(
    stories_atlas: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", str(stories_atlas), "--get", "/neuron/up/2/999.json"]) == 1
    out = capsys.readouterr()
    assert "out of range" in json.loads(out.out)["error"]
    assert main(["serve", str(stories_atlas), "--get", "neuron/up/2/7"]) == 2
    err = capsys.readouterr().err
    assert "starts with /" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert main(["serve", str(tmp_path / "nope"), "--get", "/"]) == 2
    assert "no atlas at" in capsys.readouterr().err


def test_busy_port_is_a_clear_error() -> None:
    sock = bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        with pytest.raises(ServeError, match=f"port {port} on 127.0.0.1 is in use"):
            bind("127.0.0.1", port)
    finally:
        sock.close()
    free = bind("127.0.0.1", 0)
    assert free.family == socket.AF_INET and free.getsockname()[0] == "127.0.0.1"
    free.close()


def test_a_damaged_atlas_is_a_500_that_says_so(stories_atlas: Path, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(stories_atlas, tmp_path / "atlas"))
    (copy / "up" / "layer_002.parquet").unlink()
    client = TestClient(make_app(Atlas.open(copy)))
    for path in ("/neuron/up/2/7", "/search?q=the&matrix=up"):
        r = client.get(path)
        assert r.status_code == 500
        assert "layer_002.parquet" in r.text and "map it again with --overwrite" in r.text
        twin = client.get(path + ("&" if "?" in path else "?") + "format=json")
        assert twin.status_code == 500 and "damaged" in twin.json()["error"]
    assert client.get("/neuron/up/1/7").status_code == 200  # the rest still serves


def test_a_degenerate_neuron_page_says_so_and_writes_no_nan(tmp_path: Path) -> None:
    from .test_stats import NAN, ZERO, map_damaged

    client = TestClient(make_app(Atlas.open(map_damaged(tmp_path))))
    for layer, index in (NAN, ZERO):
        r = client.get(f"/neuron/up/{layer}/{index}")
        assert r.status_code == 200
        assert "all zero or not finite" in r.text
        assert ">nan<" not in r.text and 'title="nan"' not in r.text  # n/a instead
    sound = client.get("/neuron/up/0/0")
    assert sound.status_code == 200 and "all zero or not finite" not in sound.text


def test_a_mixture_of_experts_neuron_page_names_its_expert(tmp_path: Path) -> None:
    """Neuron 70 of a Mixtral layer (4 experts of 24 units) is unit 22 of expert 2, on the
    page and in its JSON twin; a dense model's neurons name no expert."""
    from flashlens import map_model

    from .helpers import make_model

    model = make_model(tmp_path / "m", "mixtral", n_layers=1, d_mlp=24)
    map_model(model, tmp_path / "a", matrices="up", compile="off")
    client = TestClient(make_app(Atlas.open(tmp_path / "a")))
    page, data = get_both(client, "/neuron/up/0/70")
    assert (data["expert"], data["unit"]) == (2, 22)
    assert "2 (unit 22)" in " ".join(page.text)
    _, plain = get_both(client, "/neuron/up/0/5")
    assert (plain["expert"], plain["unit"]) == (0, 5)
    dense = make_model(tmp_path / "d", n_layers=1)
    map_model(dense, tmp_path / "b", matrices="up", compile="off")
    _, data = get_both(TestClient(make_app(Atlas.open(tmp_path / "b"))), "/neuron/up/0/5")
    assert "expert" not in data


def test_the_overview_says_how_the_head_reads_out(tmp_path: Path) -> None:
    """Phi-2's LayerNorm and head bias, Cohere's logit scale: in the overview's settings."""
    from flashlens import map_model

    from .helpers import make_model

    for family, shown in (
        ("phi", ["final norm", "layer", "head bias"]),
        ("cohere", ["logit scale", "0.5"]),
    ):
        model = make_model(tmp_path / family, family, n_layers=1)
        map_model(model, tmp_path / f"a-{family}", matrices="up", compile="off")
        page, _ = get_both(TestClient(make_app(Atlas.open(tmp_path / f"a-{family}"))), "/")
        text = " ".join(page.text)
        assert all(s in text for s in shown), (family, text)
