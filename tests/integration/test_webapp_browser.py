"""The annotation app in a real browser: Playwright driving Debian's Chromium against `rlhf serve` on loopback.

Sign in with the link `rlhf annotators add` prints, rank a task with the keyboard only, submit, and find the
label in the admin's export; judge a side-by-side pair with the keyboard; nothing a model wrote runs as script.
Screenshots of each page go to the test's temporary folder (RLHF_SCREENSHOTS=DIR keeps them somewhere else).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from webapp_helpers import Server, add_people, build_library

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
XSS = '<script>alert("owned")</script><img src=x onerror="alert(2)">'


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:  # not a skip: CI must run this test
        pytest.fail(
            "Chromium is not installed. Install Debian's: `apt-get install -y chromium` (or run `make test`, which "
            "does). Do not use `playwright install`: it downloads a browser, which this project's machines cannot."
        )
    return path


@pytest.fixture
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the `playwright` package is missing: pip install -e '.[dev]'")
    executable = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_rank_and_compare_with_the_keyboard_in_a_real_browser(tmp_path, browser):
    shots = Path(os.environ.get("RLHF_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    answers = [
        "Paris is the capital of France. It sits on the Seine and has about two million inhabitants.",
        f"I think it is Lyon. {XSS}",
        "The capital of France is Paris.\n\nFun fact: the city is divided into 20 arrondissements.",
        "Sorry, I can't help with geography questions.",
    ]
    db = build_library(tmp_path / "lib.db", 2, text=lambda p, i: answers[i])
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    row = {"prompt_id": "e0", "prompt": "Say hello politely.", "a": "hi", "b": "Hello! How can I help you today?"}
    (eval_dir / "generations.jsonl").write_text(json.dumps(row) + "\n")
    guidelines = tmp_path / "guidelines.md"
    guidelines.write_text("# Guidelines\n\nPrefer **helpful**, honest and harmless answers.\n")
    token = add_people(db, ["carol"], admins=("carol",))["carol"]
    with Server(db, "--compare", str(eval_dir), "--guidelines", str(guidelines)) as server:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        # 1. sign in with the link as printed by `rlhf annotators add` (the token is in the fragment)
        page.goto(f"{server.url}/signin#token={token}")
        page.wait_for_url(f"{server.url}/")
        assert "token" not in page.url
        page.screenshot(path=str(shots / "home.png"), full_page=True)

        # 2. rank with the keyboard: move the first response down one place, tie the third with the second
        page.click("text=Start ranking")
        page.wait_for_selector("#ranking .card")
        shown = [int(x) for x in page.eval_on_selector_all("#ranking .card", "cs => cs.map(c => c.dataset.sample)")]
        assert page.evaluate("document.activeElement.dataset.sample") == str(shown[0])  # keyboard-ready at once
        assert XSS in page.locator("#ranking").inner_text()  # the payload is on screen, as text
        assert page.locator("#ranking img, #ranking script").count() == 0
        page.keyboard.press("Shift+ArrowDown")
        page.keyboard.press("ArrowDown")
        page.keyboard.press("t")
        page.screenshot(path=str(shots / "rank.png"), full_page=True)
        assert page.locator("#ranking .card .pos").all_inner_texts() == ["1", "2", "2", "3"]
        page.fill("#rationale", "clear and correct first")
        page.keyboard.press("Control+Enter")
        page.wait_for_selector(f'[data-sample="{shown[0]}"]', state="detached")  # the next task is shown

        # 3. the label is in the admin's export, exactly as ranked
        export = page.request.get(f"{server.url}/admin/export/rankings.jsonl")
        assert export.ok
        (label,) = [json.loads(line) for line in export.text().splitlines()]
        ids = label["sample_ids"]
        expected = [[shown[1]], sorted([shown[0], shown[2]]), [shown[3]]]
        assert [sorted(ids[i] for i in tier) for tier in label["tiers"]] == expected
        assert label["annotator"] == "carol" and label["rationale"] == "clear and correct first"

        # 4. side by side: B is better, with the keyboard
        page.goto(f"{server.url}/compare")
        page.keyboard.press("b")
        page.screenshot(path=str(shots / "compare.png"), full_page=True)
        b_text = page.locator(".answer[data-side=B] .text").inner_text()
        page.keyboard.press("Control+Enter")
        page.wait_for_selector("text=Nothing left for you here")
        votes = page.request.get(f"{server.url}/admin/export/side-by-side.jsonl").text()
        assert json.loads(votes)["verdict"] == ("b" if b_text == row["b"] else "a")

        page.goto(f"{server.url}/admin")
        page.screenshot(path=str(shots / "admin.png"), full_page=True)
        page.goto(f"{server.url}/guidelines")
        assert page.locator("article strong").inner_text() == "helpful"

    # the payload never ran, and no script failed
    assert dialogs == [] and errors == []
    assert all((shots / f"{name}.png").stat().st_size > 10_000 for name in ("home", "rank", "compare", "admin"))
