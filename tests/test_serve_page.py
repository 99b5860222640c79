"""The routing page of `moee serve` in real headless Chromium: it loads from the server alone,
takes two sentences, and shows their HS, RW and MoEE(sum) scores and a layers x experts heatmap
that match in-process `encode`."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from moee_fast import MoEEncoder
from serve_live import LiveServer

# The screenshot goes to the test's temporary folder; set MOEE_FAST_SCREENSHOT to a path to keep it
# (benchmarks/results/serve_page.png is the one README shows).
SCREENSHOT_ENV = "MOEE_FAST_SCREENSHOT"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
SENTENCES = ["A man is playing a guitar on the street.", "Routers send each token to a few experts."]


@pytest.fixture(scope="module")
def model_path(checkpoint):
    return checkpoint("olmoe")


@pytest.fixture(scope="module")
def server(model_path):
    live = LiveServer(model_path, "--served-model-name", "tiny-olmoe (untrained)")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if shutil.which("chromium") is None:
        pytest.skip("no chromium on PATH")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def unit_cosine(x, y) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    return float(x @ y / (x.norm() * y.norm()))


def cell_value(page, table: str, row: int, column: int) -> float:
    return float(page.locator(f"#{table} tr").nth(row + 1).locator("td").nth(column).inner_text())


def test_page_compares_two_sentences_and_draws_the_routing(server, browser, model_path, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    outside = []

    def only_the_server(route):
        if route.request.url.startswith(server.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_server)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-info').textContent.includes('experts')")
    page.fill("#texts", "\n".join(SENTENCES))
    page.fill("#alpha", "0.5")
    page.click("#compare")  # waits while the first view's compare of the sample sentences runs
    page.wait_for_function("document.querySelectorAll('#hs-matrix td.score').length === 4")

    emb = MoEEncoder.from_pretrained(model_path, device="cpu").encode(SENTENCES)
    cos_hs, cos_rw = unit_cosine(emb.hs[0], emb.hs[1]), unit_cosine(emb.rw[0], emb.rw[1])
    assert page.locator("#hs-matrix td.score").count() == 4
    assert cell_value(page, "hs-matrix", 0, 1) == pytest.approx(cos_hs, abs=6e-4)
    assert cell_value(page, "rw-matrix", 1, 0) == pytest.approx(cos_rw, abs=6e-4)
    assert cell_value(page, "sum-matrix", 0, 1) == pytest.approx(cos_hs + 0.5 * cos_rw, abs=6e-4)
    assert cell_value(page, "sum-matrix", 1, 1) == pytest.approx(1.5, abs=6e-4)

    layers, experts = emb.rw.shape[1:]
    cells = page.locator("#heatmap .cell")
    assert cells.count() == layers * experts
    shot = os.environ.get(SCREENSHOT_ENV) or str(tmp_path / "serve_page.png")
    page.screenshot(path=shot, full_page=True)
    assert os.path.getsize(shot) > 0
    page.select_option("#routing-text", "1")
    title = cells.nth(experts + 2).get_attribute("title")  # layer 1, expert 2 of the second sentence
    layer, expert, probability = re.fullmatch(r"layer (\d+), expert (\d+): ([\d.]+)", title).groups()
    assert (int(layer), int(expert)) == (1, 2)
    assert float(probability) == pytest.approx(float(emb.rw[1, 1, 2]), abs=6e-5)
    assert page.locator("#error").is_hidden()
    assert page.locator("#demo-banner").is_hidden()  # a checkpoint of the user's own
    assert outside == []


def test_page_shows_the_servers_error_message(server, browser):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-info').textContent.includes('experts')")
    page.fill("#texts", "")
    page.click("#compare")
    page.wait_for_selector("#error:not([hidden])")
    assert "empty" in page.inner_text("#error")


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("demo-cache"))
    live = LiveServer("demo", env={"MOEE_FAST_CACHE": cache})
    yield live
    live.stop()


def test_the_demo_page_says_untrained_and_shows_a_first_view_untouched(demo_server, browser):
    """Opened and not touched: the banner, the sample sentences compared, the routing of the first
    drawn with labelled expert and layer axes and a colour scale up to its largest probability."""
    import json
    import urllib.request

    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(demo_server.url + "/")
    page.wait_for_selector("#heatmap .cell")
    assert page.locator("#demo-banner").is_visible() and "Untrained demo model" in page.inner_text("#demo-banner")
    sentences = [line for line in page.input_value("#texts").splitlines() if line.strip()]
    assert page.locator("#hs-matrix td.score").count() == len(sentences) ** 2

    info = json.load(urllib.request.urlopen(demo_server.url + "/info"))
    assert info["untrained_demo"] is True
    layers, experts = info["num_moe_layers"], info["num_experts"]
    assert page.locator("#heatmap .cell").count() == layers * experts
    expert_labels = page.locator("#heatmap .axis.expert").all_inner_texts()
    assert expert_labels == [str(e) for e in range(experts)]  # 16 experts: every one numbered
    assert page.locator("#heatmap .axis.layer").all_inner_texts() == [str(l) for l in range(layers)]
    titles = page.locator("#heatmap .cell").evaluate_all("cells => cells.map(c => c.title)")
    top = max(float(title.rsplit(": ", 1)[1]) for title in titles)
    assert float(page.inner_text("#scale-high")) == pytest.approx(top, abs=1.5e-3)
    assert page.locator("#scale-bar").evaluate("bar => getComputedStyle(bar).backgroundImage").startswith("linear-gradient")
