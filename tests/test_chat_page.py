"""The chat page at ``GET /``, in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by ``selenium``) loads it from a running server on the demo pair, sends two messages
and sees the streamed answers (equal to the API's), the speed / tau / cached-token line, and the draft tree of
each round with its accepted path. A screenshot is saved to ``test-artifacts/chat-page.png``. Skipped, saying
why, where no Chromium or no selenium is installed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from server_helpers import Server

webdriver = pytest.importorskip("selenium.webdriver", reason="the page test drives a browser: pip install selenium")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ARTIFACTS = Path(os.environ.get("TREEFLASH_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
QUESTIONS = ["def fibonacci(n):", "def main():"]


@pytest.fixture(scope="module")
def server():
    s = Server("--max-tokens", "40", "--tree-size", "16")  # a fixed budget: the page's τ equals the API's
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("no headless Chromium here: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


def wait(browser, seconds, condition):
    return WebDriverWait(browser, seconds, poll_frequency=0.1).until(condition)


def test_the_page_streams_answers_and_draws_each_rounds_tree(server, browser):
    status, headers, data = server.raw("GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"chat.js" in data
    assert server.raw("GET", "/static/../app.py")[0] == 404
    assert server.raw("GET", "/static/missing.js")[0] == 404

    browser.get(server.url + "/")
    wait(browser, 30, lambda b: b.find_element(By.ID, "model").text == "treeflash-demo")
    limit = browser.find_element(By.ID, "max-tokens")
    limit.clear()
    limit.send_keys("40")
    conversation = []
    for n, question in enumerate(QUESTIONS, 1):
        # the answer grows while it streams: record every length the answer's text takes in the page (a DOM
        # observer, so a fast machine's stream is seen whole, not only at polling times)
        browser.execute_script("""
            window.__lengths = new Set();
            new MutationObserver(() => {
              const texts = document.querySelectorAll('.msg.assistant .text');
              if (texts.length) window.__lengths.add(texts[texts.length - 1].textContent.length);
            }).observe(document.body, {subtree: true, childList: true, characterData: true});""")
        box = browser.find_element(By.ID, "prompt")
        box.send_keys(question)
        browser.find_element(By.ID, "send").click()
        wait(browser, 120, lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats")) == n)
        seen = set(browser.execute_script("return Array.from(window.__lengths);"))
        answer = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .text")[-1].get_attribute("textContent")
        conversation.append({"role": "user", "content": question})
        want = server.client.chat.completions.create(model="default_model", messages=conversation, max_tokens=40)
        assert answer == want.choices[0].message.content
        conversation.append({"role": "assistant", "content": want.choices[0].message.content})
        assert len(seen) > 2, "the answer was streamed, not shown at once"

        stats = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats")[-1]
        assert "tok/s" in stats.text and "\u03c4" in stats.text
        assert float(stats.get_attribute("data-tau")) == want.model_extra["treeflash"]["mean_acceptance_length"]
        assert float(stats.get_attribute("data-tps")) > 0
        if n == 2:  # the second turn extends the first: its prompt comes from the cache
            assert int(stats.get_attribute("data-cached")) > 0

        svg = browser.find_element(By.CSS_SELECTOR, "#tree svg")
        rounds = want.model_extra["treeflash"]["rounds"]
        assert int(svg.get_attribute("data-round")) == rounds, "the last round is drawn"
        nodes = browser.find_elements(By.CSS_SELECTOR, "#tree .node")
        accepted = browser.find_elements(By.CSS_SELECTOR, "#tree .node.accepted")
        assert len(nodes) == int(svg.get_attribute("data-nodes")) > 1
        assert len(accepted) == int(svg.get_attribute("data-accepted"))
        assert len(browser.find_elements(By.CSS_SELECTOR, "#tree .edge")) == len(nodes) - 1
        assert len(browser.find_elements(By.CSS_SELECTOR, "#tree .edge.accepted")) == len(accepted)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "chat-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    # an earlier round, picked with the slider, is drawn as well
    browser.execute_script("const p = document.getElementById('round-pick'); p.value = 1;"
                           "p.dispatchEvent(new Event('input'));")
    assert browser.find_element(By.CSS_SELECTOR, "#tree svg").get_attribute("data-round") == "1"


def test_the_tree_extension_is_off_unless_asked(server):
    body = {"messages": [{"role": "user", "content": "import os"}], "max_tokens": 12, "stream": True}
    plain = server.raw("POST", "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    asked = server.raw("POST", "/v1/chat/completions", json.dumps({**body, "draft_trees": True}).encode(),
                       {"Content-Type": "application/json"})
    events = [[json.loads(line[6:]) for line in data.decode().split("\n\n") if line.startswith("data: {")]
              for _, _, data in (plain, asked)]
    assert not [e for e in events[0] if "round" in e.get("treeflash", {})]
    rounds = [e["treeflash"]["round"] for e in events[1] if "round" in e.get("treeflash", {})]
    assert [r["round"] for r in rounds] == list(range(1, len(rounds) + 1)) and rounds
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1] if e["choices"])
    assert text == "".join(e["choices"][0]["delta"].get("content", "") for e in events[0] if e["choices"])
    for r in rounds:  # a tree: parents precede children; the accepted path follows parent links from the root
        assert r["parents"][0] == -1 and all(0 <= p < i for i, p in enumerate(r["parents"]) if i)
        assert r["path"][0] == 0 and all(r["parents"][b] == a for a, b in zip(r["path"], r["path"][1:]))
        assert len(r["tokens"]) == len(r["parents"])
    # round k commits its accepted path's tokens and a bonus one (len(path) counts the root for it); round 0 the
    # first token; a last round cut by max_tokens before its bonus counts one more than it committed
    assert 12 - 1 <= sum(len(r["path"]) for r in rounds) <= 12
