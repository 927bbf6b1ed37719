"""The rating page of `mole study serve` in a real headless Chromium: a scripted rater completes a small study,
partly with the keyboard, and the report counts exactly its votes; a prompt holding HTML is shown, not run."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.study_helpers import PROMPTS, StudyServer, write_eval_run
from tests.test_serve_page import CHROMIUM, CHROMIUM_FLAGS

from mole.evaluate.study.app import create_study_app
from mole.evaluate.study.design import create_study, parse_questions
from mole.evaluate.study.report import write_report
from mole.evaluate.study.store import VoteStore, database_url

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary found (`make setup` installs Debian's chromium with apt-get)"
)

#: The centre pixel of the image on one side: base's images are red, MoLE's blue (tests.study_helpers).
PIXEL = """side => { const img = document.getElementById('img-' + side);
  const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0); return Array.from(ctx.getImageData(8, 8, 1, 1).data); }"""
LOADED = """() => { const l = document.getElementById('img-left'), r = document.getElementById('img-right');
  return !document.getElementById('rating').hidden && l.complete && l.naturalWidth === 16 && r.complete
    && r.naturalWidth === 16 && document.querySelectorAll('#questions li').length > 0; }"""


def _study(tmp_path: Path, prompts=PROMPTS, questions=None):
    a = write_eval_run(tmp_path / "a", "base", (200, 0, 0), prompts=prompts)
    b = write_eval_run(tmp_path / "b", "MoLE", (0, 0, 200), prompts=prompts)
    study = create_study([a, b], tmp_path / "study", questions=questions, title="Which image is better?")
    return study, VoteStore(database_url(None, study.root), study.study_id)


def _browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)


def test_a_rater_completes_a_study_with_keys_and_clicks(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    study, store = _study(tmp_path)
    tokens: list[str] = []
    try:
        with StudyServer(create_study_app(study, store)) as server, sync_playwright() as p:
            browser = _browser(p)
            try:
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda err: errors.append(str(err)))
                page.goto(server.url + "/")
                for n in range(len(study.pairs)):
                    page.wait_for_function(LOADED)
                    assert page.inner_text("#progress-text") == f"{n} / 3 pairs rated"
                    assert page.inner_text("#prompt") in PROMPTS
                    tokens.append(page.evaluate("state.pair.token"))
                    mole = "left" if page.evaluate(PIXEL, "left")[2] == 200 else "right"
                    base = "right" if mole == "left" else "left"
                    # The rater: MoLE overall, tie on alignment and faces, base on hands.
                    if n == 0:  # keyboard only: arrows, a wrong answer taken back with Backspace, Enter
                        page.keyboard.press("ArrowLeft" if mole == "left" else "ArrowRight")
                        page.keyboard.press("ArrowDown")
                        page.keyboard.press("l")  # a slip on faces ...
                        page.keyboard.press("Backspace")
                        page.keyboard.press("t")  # ... corrected to a tie
                        assert page.locator("#submit").is_disabled()
                        page.keyboard.press("a" if base == "left" else "l")
                        assert page.locator("#submit").is_enabled()
                        page.keyboard.press("Enter")
                    elif n == 1:  # mouse only
                        for q, choice in (("overall", mole), ("alignment", "tie"), ("face", "tie"), ("hand", base)):
                            page.click(f"#questions li[data-question={q}] button[data-choice={choice}]")
                        page.click("#submit")
                    else:  # digits
                        for choice in (mole, "tie", "tie", base):
                            page.keyboard.press({"left": "1", "right": "2", "tie": "0"}[choice])
                        page.keyboard.press("Enter")
                    page.wait_for_function(f"() => !state.pair || state.pair.token !== {tokens[-1]!r}")
                page.wait_for_selector("#done:not([hidden])")
                assert page.inner_text("#progress-text") == "3 / 3 pairs rated"
                page.reload()  # a reload after the end shows nothing new
                page.wait_for_selector("#done:not([hidden])")
                assert page.inner_text("#error") == "" and not errors, errors
            finally:
                browser.close()
        assert len(set(tokens)) == 3
        report = write_report(study, store.all_votes(), track=False)
    finally:
        store.close()
    rows = {r["question"]: r for r in report["win_rates"]}
    assert report["raters"] == 1 and report["votes"] == 12 and report["answered_pairs"] == 3
    assert (rows["overall"]["a_wins"]["count"], rows["overall"]["b_wins"]["count"]) == (0, 3)  # MoLE
    assert rows["alignment"]["ties"]["count"] == 3 and rows["face"]["ties"]["count"] == 3
    assert (rows["hand"]["a_wins"]["count"], rows["hand"]["b_wins"]["count"]) == (3, 0)  # base


def test_a_prompt_with_html_is_shown_not_run(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    evil = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">"bold" & <b>co</b>'
    questions = parse_questions(['overall=Which is <i onmouseover="window.__pwned = 3">better</i>?'])
    study, store = _study(tmp_path, prompts=[evil], questions=questions)
    try:
        with StudyServer(create_study_app(study, store)) as server, sync_playwright() as p:
            browser = _browser(p)
            try:
                page = browser.new_page()
                page.goto(server.url + "/")
                page.wait_for_function(LOADED)
                assert page.inner_text("#prompt") == evil
                assert page.locator("#prompt *").count() == 0  # text, no elements
                assert page.inner_text("#questions li").startswith('Which is <i onmouseover="window.__pwned = 3">')
                page.hover("#questions li span")
                assert page.evaluate("window.__pwned") is None
                page.keyboard.press("t")
                page.keyboard.press("Enter")
                page.wait_for_selector("#done:not([hidden])")
            finally:
                browser.close()
        assert [v["choice"] for v in store.all_votes()] == ["tie"]
    finally:
        store.close()
