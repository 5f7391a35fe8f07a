"""The diagnostics page in a real headless browser (Debian's Chromium, driven by selenium) against a
real server on the demo models: the page loads, a prediction with its evidence renders from the
public API, a drawn input is explained, and a screenshot is taken (``HJSERVE_TEST_UI_SCREENSHOT`` keeps a
copy, as docs/ui.png was made)."""

from __future__ import annotations

import os
import re
import shutil

import httpx
import pytest
from svc_helpers import run_server

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER) and not os.environ.get("CI"),
                                reason="chromium / chromedriver not installed (make test installs them)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})   # console messages, read by _no_violations
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,2150"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()   # stops chromium and chromedriver (the processes this test started)


@pytest.fixture(scope="module")
def demo_server(demo_repository, tmp_path_factory):
    with run_server(demo_repository, tmp_path_factory.mktemp("ui-logs")) as server:
        yield server


def _no_violations(driver) -> None:
    """Nothing the page did was refused by its Content-Security-Policy, and no script error."""
    messages = [e["message"] for e in driver.get_log("browser")]
    bad = [m for m in messages if "Content Security Policy" in m or "Uncaught" in m]
    assert not bad, bad


def _wait(driver, predicate, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(predicate)


def test_the_page_explains_a_prediction(browser, demo_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(demo_server.url + "/")
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    assert browser.current_url.endswith("/ui/")
    models = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#model option")]
    assert {"digits_lse", "digits_memory", "diabetes_lse"} <= set(models)
    Select(browser.find_element(By.ID, "model")).select_by_value("digits_lse")
    _wait(browser, lambda d: "64 features" in d.find_element(By.ID, "model-info").text)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#grid div")) == 64   # an 8x8 image: a drawing grid
    browser.find_element(By.ID, "example").click()
    browser.find_element(By.ID, "explain").click()
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "rendered")
    assert browser.find_element(By.ID, "prediction").text == "0"   # the example is a drawn zero
    radius = float(browser.find_element(By.ID, "radius").text)
    assert radius > 0 and "no perturbation can change the predicted class" in browser.find_element(By.ID, "radius-meaning").text
    # the page shows the certified radius rounded toward zero: never more than the server certified
    row = browser.execute_script("return state.values")
    served = httpx.post(f"{demo_server.url}/v2/models/digits_lse/infer", timeout=30, json={
        "inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 64], "data": row}],
        "outputs": [{"name": "certified_radius"}]}).json()["outputs"][0]["data"][0]
    assert radius <= served and radius > 0.999 * served, (radius, served)
    assert browser.find_element(By.ID, "ood").text in ("in distribution", "flagged")
    # and the OOD p-value rounded up: never less than the server's (a smaller one reads more unusual)
    shown_p = float(re.search(r"p-value (\S+) ", browser.find_element(By.ID, "ood-meaning").text).group(1))
    served_p = httpx.post(f"{demo_server.url}/v2/models/digits_lse/infer", timeout=30, json={
        "inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 64], "data": row}],
        "outputs": [{"name": "ood_p_value"}]}).json()["outputs"][0]["data"][0]
    assert served_p <= shown_p < served_p * 1.01, (shown_p, served_p)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#attributions tr")) == 1 + 5
    assert len(browser.find_elements(By.CSS_SELECTOR, "#heatmap div")) == 64
    assert len(browser.find_elements(By.CSS_SELECTOR, "#probabilities .bar")) == 5
    assert len(browser.find_elements(By.CSS_SELECTOR, "#igmap div")) == 64   # the explanation graph's outputs
    assert browser.find_element(By.ID, "whatif").text.startswith("0 (")
    assert "the decision in the eps -> 0" in browser.find_element(By.ID, "whatif-meaning").text
    assert "Hopf–Lax" in browser.find_element(By.ID, "hj").text
    _no_violations(browser)
    shot = tmp_path / "ui.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    keep = os.environ.get("HJSERVE_TEST_UI_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_the_page_rounds_a_radius_toward_zero(browser, demo_server):
    """``fmtDown``, the page's form of a lower bound: 4 significant digits, never above the value
    (``fmt``, to nearest, shows 0.59986 as 0.5999)."""
    browser.get(demo_server.url + "/ui/")
    cases = [0.59986, 1.0486, 0.99996, 1.048319935798645, 123456.7, 9.99999e-7, 2.5, 0.0, 1e-30]
    shown = browser.execute_script("return arguments[0].map((x) => fmtDown(x))", cases)
    for x, text in zip(cases, shown, strict=True):
        assert float(text) <= x and (x == 0 or float(text) >= x * (1 - 1e-3)), (x, text)
    assert browser.execute_script("return fmt(0.59986)") == "0.5999"   # what the radius showed before


def test_the_page_rounds_a_p_value_up(browser, demo_server):
    """``fmtUp``, the page's form of an upper bound (the conformal p-value, which the server rounds
    up too): 3 significant digits, never below the value -- to nearest, a p-value of 5001/100001
    (0.0500095, above alpha = 0.05: not flagged) read as 0.05, the flagging threshold."""
    browser.get(demo_server.url + "/ui/")
    cases = [5001 / 100001, 0.7722223, 278 / 360, 0.99722224, 1.0, 1 / 360, 0.0500001, 0.12345, 9.99999e-7,
             0.0, 1e-30]
    shown = browser.execute_script("return arguments[0].map((x) => fmtUp(x, 3))", cases)
    for x, text in zip(cases, shown, strict=True):
        assert float(text) >= x and float(text) <= max(x * (1 + 1e-2), 0.0), (x, text)
        assert float(text) <= 1.0 or x > 1.0, (x, text)
    assert browser.execute_script("return fmt(5001 / 100001, 3)") == "0.05"   # what the page showed before


def test_the_page_draws_and_reports_errors(browser, demo_server):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(demo_server.url + "/ui/")
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    Select(browser.find_element(By.ID, "model")).select_by_value("digits_memory")
    _wait(browser, lambda d: "kind memory" in d.find_element(By.ID, "model-info").text)
    cells = browser.find_elements(By.CSS_SELECTOR, "#grid div")
    ActionChains(browser).click_and_hold(cells[19]).move_to_element(cells[27]).move_to_element(cells[35]) \
        .move_to_element(cells[43]).release().perform()   # a vertical stroke
    row = [float(v) for v in browser.find_element(By.ID, "row").get_attribute("value").split(",")]
    assert sum(v > 0 for v in row) >= 3
    browser.find_element(By.ID, "explain").click()
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "rendered")
    examples = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#attributions tr td:nth-child(5)")]
    assert examples and all(e.startswith("#") and "label" in e for e in examples)   # training examples
    assert browser.find_element(By.ID, "example-tile").is_displayed()   # the deciding example, drawn
    assert len(browser.find_elements(By.CSS_SELECTOR, "#examplemap div")) == 64
    assert "training example" in browser.find_element(By.ID, "flips").text
    Select(browser.find_element(By.ID, "model")).select_by_value("diabetes_lse")
    _wait(browser, lambda d: "regression" in d.find_element(By.ID, "model-info").text)
    browser.find_element(By.ID, "row").clear()
    browser.find_element(By.ID, "row").send_keys("1, 2, 3")
    browser.find_element(By.ID, "explain").click()
    _wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "must hold 10 finite numbers" in browser.find_element(By.ID, "error").text
    _no_violations(browser)


def test_the_page_is_served_with_its_policy(demo_server):
    """The page's own Content-Security-Policy (no inline script or style, no other origin, no frame);
    every other response: nosniff and no framing."""
    with demo_server.client() as c:
        page, script, api = c.get("/ui/"), c.get("/ui/app.js"), c.get("/v2/models/nope")
    for r in (page, script):
        policy = r.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy
    assert api.status_code == 404 and api.headers["content-security-policy"] == "frame-ancestors 'none'"
    for r in (page, script, api):
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"


def test_another_sites_page_cannot_unload_models(browser, tiny_repo, tmp_path):
    """The attack itself, in a real browser: a page served from another origin (a second port) sends
    the POSTs a browser allows without a preflight -- bodiless and text/plain, in no-cors mode -- to
    an hjserve in explicit mode with no keys. They arrive (counted as 403s) and change nothing."""
    import http.server
    import threading
    import time

    with run_server(tiny_repo, tmp_path, model_control_mode="explicit") as s:
        target = s.url + "/v2/repository/models/clf/unload"
        page = tmp_path / "site"
        page.mkdir()
        (page / "index.html").write_text(f"""<!doctype html><body><script>
Promise.allSettled([
  fetch("{target}", {{method: "POST", mode: "no-cors"}}),
  fetch("{target}", {{method: "POST", mode: "no-cors", headers: {{"content-type": "text/plain"}}, body: "{{}}"}}),
]).then(() => {{ document.body.dataset.state = "sent"; }});
</script></body>""")

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(page), **kw)

            def log_message(self, *a):
                pass

        site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
        threading.Thread(target=site.serve_forever, daemon=True).start()
        try:
            browser.get(f"http://127.0.0.1:{site.server_address[1]}/")
            _wait(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-state") == "sent")
            deadline = time.monotonic() + 10
            refused = 0.0
            while refused < 2 and time.monotonic() < deadline:
                metrics = httpx.get(s.url + "/metrics").text
                refused = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                              if line.startswith("hjserve_http_requests_total{") and "/unload" in line
                              and 'status="403"' in line)
                time.sleep(0.1)
            ready = httpx.get(s.url + "/v2/models/clf/versions/1/ready")
        finally:
            site.shutdown()
            site.server_close()
    assert refused == 2, metrics   # the browser sent both, with the page's Origin
    assert ready.status_code == 200
