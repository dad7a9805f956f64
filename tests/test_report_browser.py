"""report.html from ``mechlens run all``, opened from file:// in headless Chromium (Debian's ``chromium``)
through the DevTools protocol: no console errors, every figure drawn with a non-zero size inside a 1280 px
wide window (no horizontal scrolling), and every figure title and caption shown as written: tokens such as
``<s>``/``</s>`` appear as text, not eaten as markup by plotly or by the caption. Skipped, saying why, where
Chromium is not installed (CI installs it: .ci/run)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import time
import urllib.request

import pytest

from mechlens.cli import main

pytestmark = pytest.mark.slow

WIDTH, HEIGHT = 1280, 900
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the formatting mechlens writes into plotly titles on purpose; anything else (<s>, </s>) must show as text
_FORMATTING = re.compile(r"</?(br|sup|sub|b|i)\s*/?>", re.IGNORECASE)


def _visible(text: str) -> str:
    """What a title should show, without whitespace: mechlens' own formatting tags dropped, entities decoded."""
    return re.sub(r"[\s\u200b]+", "", html.unescape(_FORMATTING.sub("", text)))  # plotly adds U+200B at <br>


class Page:
    """One page of a headless Chromium, driven through the DevTools protocol (websocket-client)."""

    def __init__(self, profile):
        import websocket

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", "--remote-debugging-port=0",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit {self.proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id, self.events = 0, []

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def evaluate(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors seen so far."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif m == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(p["exceptionDetails"])[:500])
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append("log: " + p["entry"]["text"])
        return out

    def close(self):
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# every plotly figure: its size and place, whether plotly drew it, its title as given and as drawn; the page's
# scroll width; the captions' text
_PROBE = """(() => {
  const figs = [...document.querySelectorAll('.plotly-graph-div')].map(gd => {
    const r = gd.getBoundingClientRect();
    const t = gd.querySelector('.gtitle');
    return {id: gd.id, width: r.width, height: r.height, left: r.left + window.scrollX,
            right: r.right + window.scrollX, drawn: !!gd.querySelector('.main-svg'),
            title: (gd.layout && gd.layout.title && gd.layout.title.text) || '',
            shown: t ? t.textContent : ''};
  });
  return {figs, innerWidth: window.innerWidth, scrollWidth: document.documentElement.scrollWidth,
          captions: [...document.querySelectorAll('p.caption')].map(p => p.textContent)};
})()"""


def _open(page: Page, path) -> dict:
    """Load ``path`` and wait until plotly has drawn every figure (it draws after the page loads)."""
    page.call("Page.navigate", url=path.as_uri())
    deadline = time.monotonic() + 180
    while page.evaluate("document.readyState") != "complete":
        assert time.monotonic() < deadline, "report.html did not finish loading in 180 s"
        time.sleep(0.2)
    while True:
        state = page.evaluate(_PROBE)
        if state["figs"] and all(f["drawn"] for f in state["figs"]):
            break
        assert time.monotonic() < deadline, "plotly did not draw every figure in 180 s"
        time.sleep(0.5)
    time.sleep(1)  # a last resize or relayout
    return page.evaluate(_PROBE)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    pytest.importorskip("websocket", reason="websocket-client is not installed (pip install -e '.[test]')")
    page = Page(tmp_path_factory.mktemp("chromium-profile"))
    try:
        for domain in ("Runtime", "Log", "Page"):
            page.call(f"{domain}.enable")
        yield page
    finally:
        page.close()


@pytest.fixture(scope="module")
def report(browser, tmp_path_factory):
    out = tmp_path_factory.mktemp("browser") / "all"
    assert main(["run", "all", "--quiet", "--out", str(out)]) == 0
    browser.events.clear()
    return _open(browser, out / "report.html"), browser.errors()


def test_the_checks_catch_an_eaten_token_and_a_too_wide_figure(browser, tmp_path):
    """The checks below can fail: a title with a raw <s>/</s> (as the masked-LM heatmap had) loses them in
    the browser, and a figure 1600 px wide overflows the window."""
    import plotly.graph_objects as go

    from mechlens.report import render

    raw = go.Figure(go.Scatter(y=[1, 2]), layout={"title": "Masked-LM lens<br><sup>(<s>/</s> not shown)</sup>"})
    wide = go.Figure(go.Scatter(y=[1, 2]), layout={"title": "wide", "width": 1600})
    entry = {"metrics": {}, "provenance": {}}
    page = render([("control", "t", {"m": entry}, {"m": {"raw": raw, "wide": wide}})])
    (tmp_path / "r.html").write_text(page, encoding="utf-8")
    browser.events.clear()
    state = _open(browser, tmp_path / "r.html")
    eaten, too_wide = state["figs"]
    assert _visible(eaten["shown"]) != _visible(eaten["title"]) and "<s>" not in eaten["shown"]
    assert too_wide["right"] > WIDTH and state["scrollWidth"] > WIDTH


def test_no_console_errors(report):
    _, errors = report
    assert errors == []


def test_every_figure_drawn_inside_a_1280px_window(report):
    state, _ = report
    figs = state["figs"]
    assert len(figs) >= 20 and state["innerWidth"] == WIDTH
    for f in figs:
        assert f["drawn"], f"{f['title']!r}: plotly drew nothing"
        assert f["width"] > 100 and f["height"] > 100, f
        assert f["left"] >= 0 and f["right"] <= WIDTH, f"{f['title']!r} is {f['width']:.0f} px wide, outside the window"
    assert state["scrollWidth"] <= WIDTH  # no horizontal scrollbar


def test_titles_and_captions_shown_as_written(report):
    state, _ = report
    figs = state["figs"]
    assert sum("&lt;s&gt;" in f["title"] for f in figs) >= 1  # the masked-LM heatmap's "(<s>/</s> not shown)"
    for f in figs:
        assert f["title"] and _visible(f["shown"]) == _visible(f["title"]), (f["title"], f["shown"])
    captions = state["captions"]
    assert len(captions) == len(figs)
    for f, c in zip(figs, captions, strict=True):  # each caption follows its figure and repeats the title
        assert _visible(f["title"]) in re.sub(r"[\s—]+", "", c), (f["title"], c)
    heatmap = [c for c in captions if "Masked-LM lens" in c]
    assert heatmap and all("(<s>/</s> not shown)" in c for c in heatmap), heatmap
