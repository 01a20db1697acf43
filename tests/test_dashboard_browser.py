"""The dashboard in a real browser: headless Chromium driven by selenium with the
system chromedriver (Debian's ``chromium`` and ``chromium-driver``, which CI installs),
against a running CLI organism. Each page's screenshot is saved under the test's
temporary folder (and copied to docs/dashboard-*.png when DASHBOARD_SCREENSHOTS=docs)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
from cli_process import ROOT
from dashboard_organism import (
    HOSTILE,
    TOKEN,
    Organism,
    node,
    quote,
    running_organism,
    transport_head,
)
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def organism(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Organism]:
    with running_organism(tmp_path_factory.mktemp("browser")) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium.webdriver.chrome.service import Service

    if CHROMIUM is None or not os.path.exists(CHROMEDRIVER):
        # Fails, never skips: a skipped browser test would count as passing.
        pytest.fail("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--disable-gpu", "--window-size=1400,900"):  # fmt: skip
        options.add_argument(arg)
    if CHROMIUM is not None:
        options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()  # ends chromium and chromedriver


def wait(driver: Any, condition: Any, what: str, timeout: float = 20.0) -> Any:
    """WebDriverWait that says what did not happen.

    Raises:
        TimeoutError: ``condition(driver)`` stayed falsy.
    """
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException as exc:
        raise TimeoutError(f"{what}: not seen within {timeout:g} s") from exc


def screenshot(driver: Any, folder: Path, name: str) -> Path:
    """Save the page as ``folder/dashboard-NAME.png`` (and in docs/ when asked)."""
    path = folder / f"dashboard-{name}.png"
    driver.save_screenshot(str(path))
    if os.environ.get("DASHBOARD_SCREENSHOTS") == "docs":
        shutil.copyfile(path, ROOT / "docs" / path.name)
    return path


def open_page(driver: Any, organism: Organism, path: str) -> None:
    driver.get(organism.base + path)
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"),
         f"{path} ready")  # fmt: skip


def no_script_ran(driver: Any) -> bool:
    return not driver.execute_script("return window.__pwned === true")


def test_the_graph_shows_every_listener_and_counters_move(
    organism: Organism, browser: Any, tmp_path: Path
) -> None:
    open_page(browser, organism, "/")
    nodes = browser.find_elements(By.CSS_SELECTOR, "#graph g.node.listener")
    assert {n.get_attribute("data-listener") for n in nodes} == {"checker", "front"}

    def handled(driver: Any) -> int:
        row = driver.find_element(By.CSS_SELECTOR, '#listeners tr[data-listener="checker"]')
        text = row.find_elements(By.TAG_NAME, "td")[2].text
        return int(text) if text.isdigit() else -1

    wait(browser, lambda d: handled(d) >= 0, "the first live event")
    before = handled(browser)
    organism.send(*(f"live-{i}" for i in range(20)))
    wait(browser, lambda d: handled(d) >= before + 20, "the handled counter moving by 20")
    live = browser.find_element(By.CSS_SELECTOR, '#graph g[data-listener="checker"] text.live')
    assert "in/s" in live.text
    screenshot(browser, tmp_path, "organism")


def test_a_conversation_opens_with_its_frames_and_hostile_payloads_stay_text(
    organism: Organism, browser: Any, tmp_path: Path
) -> None:
    organism.send(*HOSTILE)
    thread = organism.conversation_of(HOSTILE[1])
    open_page(browser, organism, "/conversations")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "button[data-conversation]"),
         "the recent conversations")  # fmt: skip
    search = browser.find_element(By.ID, "search")
    search.send_keys(thread)
    browser.find_element(By.CSS_SELECTOR, "#search-form button").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#conversation li.frame"),
         "the conversation's frames")  # fmt: skip
    frames = browser.find_elements(By.CSS_SELECTOR, "#conversation li.frame")
    assert len(frames) == 2  # the outside's root frame and checker's
    payloads = [p.text for p in browser.find_elements(By.CSS_SELECTOR, "#conversation pre")]
    # Shown as the text it is: the payload's XML, with its own escapes.
    assert any(escape(HOSTILE[1]) in text for text in payloads), payloads
    assert not browser.find_elements(By.CSS_SELECTOR, "#conversation img")
    assert not browser.find_elements(By.CSS_SELECTOR, "#main script")
    assert no_script_ran(browser)
    screenshot(browser, tmp_path, "conversation")
    # The other hostile name, opened from the URL.
    other = organism.conversation_of(HOSTILE[0])
    open_page(browser, organism, "/conversations?id=" + quote(other))
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#conversation pre"), "frames")
    assert any(escape(HOSTILE[0]) in p.text for p in browser.find_elements(By.CSS_SELECTOR, "pre"))
    assert not browser.find_elements(By.CSS_SELECTOR, "#main script")


def test_replay_is_refused_without_the_token_and_answers_once_with_it(
    organism: Organism, browser: Any, tmp_path: Path
) -> None:
    organism.send("flaky-browser", "boom")
    letter = organism.dead_letter("flaky-browser")
    organism.dead_letter("boom")
    open_page(browser, organism, "/deadletters")
    row = f'tr[data-letter="{letter["id"]}"]'
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row), "the letter's row")
    screenshot(browser, tmp_path, "deadletters")
    result = browser.find_element(By.ID, "action-result")
    browser.find_element(By.CSS_SELECTOR, f"{row} button.replay").click()
    wait(browser, lambda d: "refused" in result.text, "the refusal")
    assert organism.replies_with("<name>flaky-browser</name>") == 0
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, f"{row} button.replay").click()
    wait(browser, lambda d: "replayed" in result.text, "the replay")
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, row), "the row gone")
    organism_answered = organism.replies_with("<name>flaky-browser</name>")
    wait(browser, lambda d: organism.replies_with("<name>flaky-browser</name>") == 1,
         "the one answer")  # fmt: skip
    assert organism_answered <= 1


def test_the_nodes_page_shows_the_nodes_and_their_pending_entries(
    browser: Any, tmp_path: Path, redis_server: Any
) -> None:
    """Nodes ``a`` (the dashboard) and ``b`` (serving ``checker``, holding what it gets)
    on the Redis transport: the page lists both and the entries pending on ``b``."""
    head = transport_head(redis_server.url, f"browser-nodes-{tmp_path.name}")
    extra = ("--node", "a", "--listeners", "front")
    with running_organism(tmp_path, head=head, extra=extra) as organism, \
            node(tmp_path, "b", hold=True):  # fmt: skip
        open_page(browser, organism, "/nodes")
        organism.send("hold-1", "hold-2")

        def tables(driver: Any) -> Any:
            # Read in one script: the page rebuilds the tables on every event.
            return driver.execute_script(
                "const text = (s) => Array.from(document.querySelectorAll(s), (r) =>"
                " [r.dataset.node || r.dataset.listener, r.textContent]);"
                "return {nodes: text('#nodes tr[data-node]'),"
                " inboxes: text('#inboxes tr[data-listener]')};"
            )

        def pending_on_b(driver: Any) -> bool:
            seen = tables(driver)
            inbox = dict(seen["inboxes"]).get("checker", "")
            return "b:2" in inbox and len(seen["nodes"]) == 2

        wait(browser, pending_on_b, "nodes a and b listed, 2 entries pending on b", 30)
        held = "return document.querySelector('[data-held=\"b\"]').textContent"
        wait(browser, lambda d: d.execute_script(held) == "2", "b's heartbeat: it holds 2")
        wait(browser, lambda d: "checker:0,1,2,3" in dict(tables(d)["nodes"]).get("b", ""),
             "b's shards from its leases")  # fmt: skip
        nodes = dict(tables(browser)["nodes"])
        assert list(nodes) == ["a", "b"]
        assert "(this one)" in nodes["a"] and "checker" in nodes["b"]
        screenshot(browser, tmp_path, "nodes")


def test_without_a_transport_the_nodes_page_says_so(organism: Organism, browser: Any) -> None:
    open_page(browser, organism, "/nodes")
    assert "one process" in browser.find_element(By.ID, "no-transport").text
