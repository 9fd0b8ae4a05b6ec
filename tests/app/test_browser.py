"""common.app in a real browser: Debian's chromium, headless, driven by playwright (no browser is downloaded).

Opens the page, uploads a file in every tab (a report text where the tab reads one), waits for the result, checks
its text and saves a screenshot per tab under the test's tmp folder. With ``MEDVL_SCREENSHOTS=docs/app`` the same
screenshots are also written there (the README's pictures).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NIH = "cxr_samples/00000001_000.png"
TBX = "cxr_tbx11k/tb_tb0005.png"
FLAIR = "brats2015/test/brats_2013_pat0001_1/Flair_subtrMeanDivStd.nii.gz"


def drive(url: str, cases: list[tuple[str, str, Path, str | None, str]], shots: Path, profile: Path) -> dict:
    """For each (pipeline, tab title, file, text, expected result text): open the tab, upload, predict, wait, check;
    returns {pipeline: the status line}; screenshots ``shots/<pipeline>.png``."""
    from playwright.sync_api import sync_playwright

    seen = {}
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(str(profile), executable_path=str(CHROMIUM), args=ARGS,
                                                        headless=True, viewport={"width": 1400, "height": 1000})
        try:
            page = browser.new_page()
            outside = []
            page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else outside.append(r.url))
            page.goto(url, wait_until="load")
            page.get_by_role("tab", name=cases[0][1]).wait_for(timeout=30_000)
            for name, title, path, text, expected in cases:
                page.get_by_role("tab", name=title).click()
                page.locator(f"#{name}-upload input[type=file]").set_input_files(str(path))
                if text is not None:
                    page.locator(f"#{name}-text textarea").fill(text)
                page.wait_for_timeout(300)  # the upload reaches the server
                page.locator(f"#{name}-predict").click()
                status = page.locator(f"#{name}-status")
                status.get_by_text("done").or_(status.get_by_text("error")).wait_for(timeout=60_000)
                page.wait_for_timeout(800)  # the figures load
                seen[name] = status.inner_text().strip()
                seen[f"{name}_probs"] = page.locator(f"#{name}-probs").is_visible()
                assert expected in page.locator(f"#{name}-result").inner_text(), name
                page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
        finally:
            browser.close()
    seen["_outside"] = outside  # requests to anywhere but the app (CDNs, analytics): none expected
    return seen


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="no /usr/bin/chromium on this machine (apt-get install chromium)")
def test_tabs_in_headless_chromium(app_server, shared_data, histology_run, tmp_path):
    pytest.importorskip("playwright")
    url, _ = app_server
    tile = sorted((histology_run[1] / "NC").glob("*.jpg"))[0]
    cases = [("pneumonia", "Pneumonia", shared_data / NIH, None, "label"),
             ("cxr_localize", "CXR localize", shared_data / TBX, "Opacity in the right upper lobe.", "mass_right_lung"),
             ("mavl_chexpert", "CheXpert findings", shared_data / NIH, None, "label_"),
             ("pathology_brats", "BraTS-Path tiles", tile, "Sheets of crowded pleomorphic atypical cells.", "class"),
             ("brain3d_report", "Brain MRI report", shared_data / FLAIR, "left frontal", "explain_phrase")]
    seen = drive(url, cases, tmp_path / "shots", tmp_path / "profile")
    assert seen.pop("_outside") == []  # offline: no CDN, fonts or analytics requests
    shown = {name: seen.pop(f"{name}_probs") for name, *_ in cases}
    assert shown == {"pneumonia": True, "cxr_localize": False, "mavl_chexpert": True, "pathology_brats": True,
                     "brain3d_report": False}  # the probabilities panel only where the pipeline gives some
    assert all(line.startswith("done") for line in seen.values()), seen
    assert sorted(p.name for p in (tmp_path / "shots").iterdir()) == sorted(f"{c[0]}.png" for c in cases)
    target = os.environ.get("MEDVL_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for shot in (tmp_path / "shots").iterdir():
            shutil.copy(shot, Path(target) / shot.name)
