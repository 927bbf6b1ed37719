"""The comparison page of `mole serve` in a real headless Chromium: type a prompt, press generate, see base and
MoLE side by side for the same seed, with the MoLE image's gate values plotted."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from tests.serve_helpers import build_tiny_mole, serve

from mole.generate import load_pipeline

#: Debian's chromium (Playwright's own browser download does not work on these machines).
CHROMIUM = os.environ.get("MOLE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
#: Without the networking flags Chromium keeps trying hosts this machine cannot reach (shared/ENVIRONMENT.md).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary found (`make setup` installs Debian's chromium with apt-get)"
)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    experts, gates = build_tiny_mole(tiny_model_dir, tmp_path_factory.mktemp("page-mole"))
    with serve(load_pipeline(tiny_model_dir, experts, gates, device="cpu")) as s:
        yield s


def test_page_shows_base_and_mole_side_by_side(server, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('width').value === '64'")  # /v1/info has answered
            assert "base, experts, mole" in page.inner_text("#status")
            # The page as first opened: the prompt box holds the example, so Generate works without typing.
            assert page.input_value("#prompt") == "a close-up photo of a smiling woman waving her hand"
            page.fill("#steps", "2")
            page.fill("#seed", "5")
            page.click("#generate")
            for mode in ("base", "mole"):
                page.wait_for_function(
                    f"() => {{ const i = document.getElementById('img-{mode}'); "
                    "return i && i.complete && i.naturalWidth === 64 && i.naturalHeight === 64; }",
                    timeout=60_000,
                )
            captions = [page.inner_text(f"#caption-{mode}") for mode in ("base", "mole")]
            assert captions[0].startswith("base") and captions[1].startswith("MoLE")
            assert all("seed 5" in c for c in captions), captions  # the same seed on both sides
            base_src = page.get_attribute("#img-base", "src")
            mole_src = page.get_attribute("#img-mole", "src")
            assert base_src.startswith("data:image/png;base64,") and base_src != mole_src
            # The gate plot: one line per expert and gate kind (global and local), named after the experts.
            page.wait_for_selector("#gates:not([hidden])")
            lines = page.locator("#gate-plot polyline.gate-line")
            assert lines.count() == 4
            assert {lines.nth(i).get_attribute("data-expert") for i in range(4)} == {"face", "hand"}
            assert "face (global)" in page.inner_text("#legend")
            assert page.inner_text("#error") == ""
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            # Gates of two experts that coincide exactly (as untrained or saturated gates do): both colours show.
            page.evaluate("plotGates({experts: ['face', 'hand'], global: [[0.6, 0.6], [0.6, 0.6]], local: []})")
            plot = Image.open(io.BytesIO(page.locator("#gate-plot").screenshot())).convert("RGB")
            for expert, color in (("face", (0xD9, 0x48, 0x0F)), ("hand", (0x1C, 0x7E, 0xD6))):
                assert _pixels_near(plot, color) > 50, f"the {expert} gate lines are hidden"

            # An emptied prompt box sends the example (the placeholder), not an empty prompt.
            page.fill("#prompt", "")
            page.click("#generate")
            page.wait_for_function(
                "() => { const c = document.getElementById('caption-mole');"
                " return c && c.textContent.includes('seed'); }",
                timeout=60_000,
            )
            assert page.inner_text("#error") == ""

            # A bad field is shown, not swallowed.
            page.fill("#width", "65")
            page.click("#generate")
            page.wait_for_function("document.getElementById('error').textContent.startsWith('width: ')")
            assert page.inner_text("#caption-mole").endswith("failed")
            assert not errors, errors
        finally:
            browser.close()


def _pixels_near(image: Image.Image, color: tuple[int, int, int], tolerance: int = 30) -> int:
    """How many pixels of ``image`` lie within ``tolerance`` (per channel) of ``color``."""
    return sum(1 for px in image.getdata() if all(abs(a - b) <= tolerance for a, b in zip(px, color, strict=True)))
