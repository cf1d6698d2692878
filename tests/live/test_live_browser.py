"""The live page in a real browser (headless Chromium over CDP) against a running demo:
requests appear within seconds, the figures match the receipts, the page fits a phone,
and its JavaScript logs no error. Screenshots are kept in test-artifacts/."""

from __future__ import annotations

import os
import shutil

import aiohttp

from .chromium import Browser, chromium_binary
from .support import ARTIFACTS, REPO, running_demo

APPEAR_SECONDS = 20.0
"""Generous for a shared CI machine; the demo settles a request in well under a second."""


async def test_live_page_shows_requests_as_they_settle_without_errors() -> None:
    chromium_binary()  # skip (or fail under CI) before starting anything
    browser = Browser()
    async with running_demo() as urls:
        try:
            await browser.start()
            await browser.navigate(urls["live"])
            state = await browser.wait_for("document.getElementById('conn').dataset.state === 'live'", APPEAR_SECONDS)
            assert state, "the page never connected to its event stream"
            final_rows = await browser.wait_for("document.querySelectorAll('#requests tbody tr.final').length", APPEAR_SECONDS)
            assert final_rows, "no settled request appeared"
            # Rows keep arriving over the stream (not just the first snapshot).
            first = await browser.evaluate("Number(document.body.dataset.requests)")
            more = await browser.wait_for(f"Number(document.body.dataset.requests) > {first}", APPEAR_SECONDS)
            assert more, "no request arrived after the first snapshot"

            # A final row's figures are the proxy's receipt for that request.
            row = await browser.evaluate(
                "(() => { const tr = document.querySelector('#requests tbody tr.final');"
                " return {id: tr.dataset.id, cells: [...tr.cells].map(c => c.textContent)}; })()"
            )
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{urls['proxy']}/carbon-proxy/v1/receipts/{row['id']}") as response:
                    assert response.status == 200
                    receipt = await response.json()
            assert receipt["status"] == "final"
            time_cell, model, tenant, tokens, joules, grams, status = row["cells"]
            assert tenant in ("search", "chat", "batch")
            assert status.startswith("final · 200")
            assert float(joules.replace(",", "")) == float(f"{receipt['energy_joules']:.3g}")
            assert float(grams) == float(f"{receipt['co2e_grams']:.3g}")
            if receipt["images"]:
                assert tokens.startswith(f"{receipt['images']} image")
            else:
                assert model == receipt["model"] and tokens == f"{receipt['prompt_tokens']} / {receipt['output_tokens']}"

            # Aggregates and state are filled in from the stream.
            power = await browser.wait_for(
                "[...document.querySelectorAll('#groups .w')].every(e => e.textContent.endsWith(' W'))"
                " && document.querySelectorAll('#groups .w').length === 3", APPEAR_SECONDS
            )  # fmt: skip
            assert power, "power per device group never showed"
            facts = await browser.evaluate(
                "({gph: gph.textContent, intensity: intensity.textContent, source: source.textContent,"
                " meter: document.getElementById('meter-ok').textContent, bars: minutes.querySelectorAll('rect').length})"
            )
            assert facts["gph"].endswith("/h") and facts["gph"] != "–/h"
            assert facts["intensity"].startswith("450") and facts["source"] == "constant"
            assert facts["meter"] == "OK" and facts["bars"] >= 1
            unique = await browser.evaluate(
                "(() => { const ids = [...document.querySelectorAll('#requests tbody tr')].map(tr => tr.dataset.id);"
                " return ids.length > 0 && new Set(ids).size === ids.length; })()"
            )
            assert unique, "a request shows once: its final row replaces its provisional one"
            await browser.screenshot(ARTIFACTS / "live-page.png")

            # A phone: nothing wider than the screen (the table scrolls inside its box).
            await browser.viewport(390, 844, mobile=True)
            overflow = await browser.wait_for("document.documentElement.scrollWidth <= window.innerWidth", 5)
            assert overflow, "the page is wider than a phone's screen"
            await browser.screenshot(ARTIFACTS / "live-page-phone.png")
            assert browser.errors == [], browser.errors
        finally:
            await browser.close()
    if os.environ.get("CARBON_PROXY_UPDATE_DOCS"):
        shutil.copyfile(ARTIFACTS / "live-page.png", REPO / "docs" / "live-page.png")
