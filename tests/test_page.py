"""The web page (`GET /`) in a real headless Chromium driven by Selenium, against a real server.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package (`.ci/run` installs
them); skips with the reason when one is absent. The browser never reaches the network: the
page is self-contained and the service listens on 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")

from flashface_trt.runtime.sampling.params import PARAMS, RECIPES  # noqa: E402

from .serving import (  # noqa: E402
    SIZE,
    face_png,
    generation,
    register,
    service,
    wait_job,
    wait_state,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
KEY = "page-key"
STEPS, SEED, SAMPLES = 3, 11, 2
PROMPT = "a woman in a garden"
CONTROLS = ("num_samples", "width", "height", "steps", "seed", "recipe")
CONTROLS += ("text_guidance", "face_guidance", "ref_strength", "ref_strength_before", "step_to_launch")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason=f"{CHROMIUM} or {CHROMEDRIVER} is absent (apt-get install chromium chromium-driver)",
)

# Logs every value the page gives the progress bar, with the bar's max at that moment.
RECORD_PROGRESS = """
const bar = document.getElementById("progress");
const value = Object.getOwnPropertyDescriptor(HTMLProgressElement.prototype, "value");
window.progressLog = [];
Object.defineProperty(bar, "value", {
  configurable: true,
  get() { return value.get.call(this); },
  set(v) { value.set.call(this, v); window.progressLog.push([this.value, this.max]); },
});
"""

# Each shown image: its decoded size, the bytes behind its URL and its pixels drawn on a canvas.
READ_IMAGES = """
const done = arguments[arguments.length - 1];
Promise.all([...document.querySelectorAll("#images img")].map(async (img) => {
  await img.decode();
  const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const rgba = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let pixels = "";
  for (const b of rgba) pixels += String.fromCharCode(b);
  return {width: img.naturalWidth, height: img.naturalHeight, png: btoa(binary), rgba: btoa(pixels)};
})).then(done, (e) => done({error: String(e)}));
"""


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=DriverService(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(60)
    driver.set_window_size(1280, 1400)
    try:
        yield driver
    finally:
        driver.quit()


def _status(driver) -> tuple[str, str]:
    el = driver.find_element("id", "status")
    return el.text, el.get_attribute("class")


def _wait(driver, what, timeout: float = 120.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: what(d))


def _type(driver, element_id: str, text: str) -> None:
    el = driver.find_element("id", element_id)
    el.clear()
    el.send_keys(text)


def _shown(el, min_width: float = 1.0, min_height: float = 1.0, timeout: float = 10.0) -> dict:
    """`el` is displayed with a box at least this large within `timeout` (an image has its height
    once loaded); its box."""
    end = time.monotonic() + timeout
    while True:
        box = el.rect
        if el.is_displayed() and box["width"] >= min_width and box["height"] >= min_height:
            return box
        assert time.monotonic() < end, (el.get_attribute("outerHTML")[:200], el.is_displayed(), box)
        time.sleep(0.05)


def _listed(driver) -> list[tuple[str, bool]]:
    """The identity list: (id, chosen) per row, as shown (read at once: the page re-renders it)."""
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#identities li input')].map((r) => [r.value, r.checked])"
    )
    return [tuple(r) for r in rows]


def _history(driver) -> dict[str, tuple[str, list[str]]]:
    """The job history: job id -> (state shown, its buttons' classes), read at once."""
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#history tr')].map((r) => [r.dataset.job, "
        "r.cells[1].textContent, [...r.querySelectorAll('button')].map((b) => b.className)])"
    )
    return {job: (state, buttons) for job, state, buttons in rows}


def _screenshot(driver, path: Path) -> None:
    """A screenshot kept as the test's artifact (its path printed: `pytest -s` shows it)."""
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 0
    print(f"page screenshot: {path}")


def _check_controls(d) -> None:
    """Every control's range, step and default are the request schema's; guidance follows the recipe."""
    controls = d.find_elements("css selector", "[data-param]")
    names = {c.get_attribute("data-param") for c in controls}
    assert set(CONTROLS) <= names, names
    for c in controls:
        p = PARAMS[c.get_attribute("data-param")]
        _shown(c, 20, 10)
        if c.get_attribute("type") == "number":
            assert (float(c.get_attribute("min")), float(c.get_attribute("max"))) == (p.lo, p.hi), p.name
            step = c.get_attribute("step")
            assert step == (str(p.multiple_of) if p.kind == "int" else "any"), (p.name, step)
            if p.default is not None:
                assert float(c.get_attribute("value")) == p.default, p.name
            elif p.name in ("height", "width"):
                assert c.get_attribute("value") == "", p.name  # the service's size
    options = [o.get_attribute("value") for o in d.find_elements("css selector", "#recipe option")]
    assert options == list(RECIPES)
    recipe = d.find_element("id", "recipe")
    for name in (*RECIPES, options[0]):
        d.execute_script("arguments[0].value = arguments[1]; arguments[0].onchange()", recipe, name)
        for field, value in vars(RECIPES[name].guidance).items():
            assert float(d.find_element("id", field).get_attribute("value")) == value, (name, field)


def test_page_registers_generates_and_shows_progress_and_images(browser, tmp_path, one_torch_thread):
    face = tmp_path / "face3.png"
    face.write_bytes(face_png(3))
    with service(tmp_path / "data", api_keys=(KEY,), max_queue=4) as api:
        d = browser
        d.get(api.url + "/")
        assert d.title == "FlashFace-TRT"
        _check_controls(d)
        generate = d.find_element("id", "generate")
        assert not generate.is_enabled()

        # error paths: no photo chosen, then a wrong key (the service answers 401)
        d.find_element("id", "register").click()
        assert _status(d) == ("Choose at least one photo.", "error")
        _type(d, "key", "wrong-key")
        d.find_element("id", "photos").send_keys(str(face))
        d.find_element("id", "cropped").click()
        d.find_element("id", "register").click()
        text, cls = _wait(d, lambda d: _status(d)[1] == "error" and _status(d))
        assert "missing or unknown API key" in text, text
        assert d.find_element("id", "identity").text == "" and not generate.is_enabled()

        # the right key: registered under it (the same photo through the API gives the same id)
        _type(d, "key", KEY)
        d.find_element("id", "register").click()
        _wait(d, lambda d: _status(d)[0] == "Ready to generate.")
        client = api.client(KEY)
        ident = register(client, 3)
        shown = d.find_element("id", "identity").text
        assert shown == f"identity {ident['id']} ({ident['num_refs']} references)", shown
        assert generate.is_enabled()

        # a request the service refuses (422): its message is shown and Generate works again
        _type(d, "steps", "0")
        generate.click()
        text, cls = _wait(d, lambda d: _status(d)[1] == "error" and _status(d))
        assert text.startswith("steps=0 must be"), text
        _wait(d, lambda d: generate.is_enabled())

        _type(d, "prompt", PROMPT)
        _type(d, "steps", str(STEPS))
        _type(d, "seed", str(SEED))
        _type(d, "samples", str(SAMPLES))
        d.execute_script(RECORD_PROGRESS)
        generate.click()
        _wait(d, lambda d: _status(d)[0].startswith(("Done", "failed", "cancelled")))
        assert _status(d) == (f"Done: {SAMPLES} image(s).", "muted") and generate.is_enabled()

        # the bar was filled step by step from the event stream, and ends full
        log = d.execute_script("return window.progressLog")
        assert [v for v, _ in log] == list(range(STEPS + 1)), log
        assert all(m == STEPS for _, m in log[1:]), log
        bar = d.find_element("id", "progress")
        assert int(bar.get_attribute("value")) == int(bar.get_attribute("max")) == STEPS

        # the job the page made, under its key, and the images it shows are that job's PNGs
        (job,) = client.get("/v1/generations").json()["jobs"]
        assert (job["state"], job["steps"], job["seed"]) == ("succeeded", STEPS, SEED), job
        assert len(job["images"]) == SAMPLES
        shown_images = d.execute_async_script(READ_IMAGES)
        assert len(shown_images) == SAMPLES, shown_images
        for url, img in zip(job["images"], shown_images):
            png = client.get(url).content
            assert img["width"] > 0 and (img["height"], img["width"]) == SIZE
            assert base64.b64decode(img["png"]) == png
            rgba = np.frombuffer(base64.b64decode(img["rgba"]), np.uint8).reshape(*SIZE, 4)
            expected = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            assert np.array_equal(rgba[..., :3], expected)

        # shown large (the 64-px images fill a column), each with a download link to its own bytes
        figures = d.find_elements("css selector", "#images figure")
        assert len(figures) == SAMPLES
        for k, figure in enumerate(figures):
            img, link = figure.find_element("tag name", "img"), figure.find_element("link text", "Download")
            small = _shown(img, 256, 256)
            _shown(link)
            assert link.get_attribute("href") == img.get_attribute("src")
            assert link.get_attribute("download") == f"flashface-{job['id']}-{k}.png"
        # enlarged on click, with its download link; closed again
        figures[0].find_element("tag name", "img").click()
        viewer, big = d.find_element("id", "viewer"), d.find_element("id", "big")
        _wait(d, lambda d: viewer.is_displayed())
        assert _shown(big, 1.5 * small["width"])["width"] > small["width"]
        assert big.get_attribute("src") == figures[0].find_element("tag name", "img").get_attribute("src")
        assert (
            d.find_element("id", "big-download").get_attribute("download") == f"flashface-{job['id']}-0.png"
        )
        _screenshot(d, tmp_path / "page-enlarged.png")
        d.find_element("id", "close").click()
        _wait(d, lambda d: not viewer.is_displayed())

        # the identity list shows the registered identity, chosen; the history lists the job, ended
        assert _listed(d) == [(ident["id"], True)]
        _wait(d, lambda d: _history(d).get(job["id"], ("",))[0] == "succeeded")
        assert _history(d) == {job["id"]: ("succeeded", ["show"])}
        _shown(d.find_element("id", "history"))
        _screenshot(d, tmp_path / "page.png")

        # the page sent the prompt, steps, seed and samples it shows: the API, asked the same, agrees
        body = generation(ident["id"], prompt=PROMPT, negative_prompt="", steps=STEPS, seed=SEED)
        again = wait_job(
            client, client.post("/v1/generations", json={**body, "num_samples": SAMPLES}).json()["id"]
        )
        assert [client.get(u).content for u in again["images"]] == [
            client.get(u).content for u in job["images"]
        ]

        # a reload remembers the key and the identity; the history lists both jobs
        d.refresh()
        _wait(d, lambda d: d.find_element("id", "identity").text == shown)
        assert d.find_element("id", "key").get_attribute("value") == KEY
        assert _listed(d) == [(ident["id"], True)] and d.find_element("id", "generate").is_enabled()
        _wait(d, lambda d: set(_history(d)) == {job["id"], again["id"]})

        # deleting removes it from the list and from the service; nothing is chosen then
        d.find_element("css selector", "#identities li button.delete").click()
        _wait(d, lambda d: _listed(d) == [])
        assert client.get(f"/v1/identities/{ident['id']}").status_code == 404
        assert (
            d.find_element("id", "identity").text == "" and not d.find_element("id", "generate").is_enabled()
        )
        d.refresh()
        _wait(d, lambda d: "No identities" in d.find_element("id", "identities-note").text)
        assert d.find_element("id", "identity").text == ""


def _click(driver, selector: str) -> None:
    """Click the shown element (found again where the page re-rendered it meanwhile)."""
    from selenium.common.exceptions import StaleElementReferenceException

    def attempt(d) -> bool:
        try:
            el = d.find_element("css selector", selector)
            _shown(el)
            el.click()
            return True
        except StaleElementReferenceException:
            return False

    _wait(driver, attempt, 10)


def test_page_lists_newest_first_remembers_the_choice_and_cancels(browser, tmp_path, one_torch_thread):
    # one job at a time (a 3-row batch): a second one waits in the queue
    with service(tmp_path / "data", api_keys=(KEY,), max_queue=4, max_batch_rows=3) as api:
        client = api.client(KEY)
        older, newer = register(client, 1), register(client, 2)
        d = browser
        d.get(api.url + "/")
        _type(d, "key", KEY)
        d.find_element("id", "refresh").click()  # the key's change event lists its identities and jobs
        _wait(d, lambda d: len(_listed(d)) == 2)
        assert _listed(d) == [(newer["id"], False), (older["id"], False)]  # newest first, none chosen
        assert not d.find_element("id", "generate").is_enabled()
        _click(d, f'#identities input[value="{older["id"]}"]')
        assert _listed(d) == [(newer["id"], False), (older["id"], True)]
        d.refresh()
        _wait(d, lambda d: (older["id"], True) in _listed(d))
        assert (
            d.find_element("id", "identity").text
            == f"identity {older['id']} ({older['num_refs']} references)"
        )

        # a running and a queued job of this key (submitted elsewhere) are listed, and cancelled from here
        body = generation(older["id"], steps=1000)
        running = client.post("/v1/generations", json=body).json()
        wait_state(client, running["id"], "running")
        queued = client.post("/v1/generations", json=body).json()
        assert queued["state"] == "queued"
        d.find_element("id", "refresh").click()
        listed = {running["id"]: ("running", ["cancel-job"]), queued["id"]: ("queued", ["cancel-job"])}
        _wait(d, lambda d: _history(d) == listed)
        for j in (queued, running):
            _click(d, f'#history tr[data-job="{j["id"]}"] button.cancel-job')
            assert wait_state(client, j["id"], "cancelled")["step"] < 1000
            _wait(d, lambda d, j=j: _history(d)[j["id"]] == ("cancelled", []))

        # the page's own job: Cancel stops it while it runs
        _type(d, "steps", "1000")
        d.find_element("id", "generate").click()
        _wait(d, lambda d: _status(d)[0].startswith("Step ") and len(_history(d)) == 3)
        (mine,) = set(_history(d)) - {running["id"], queued["id"]}
        _click(d, "#cancel")
        _wait(d, lambda d: _status(d)[0].startswith("cancelled"))
        assert wait_state(client, mine, "cancelled")["step"] < 1000
        _wait(d, lambda d: _history(d)[mine] == ("cancelled", []))
        assert (
            d.find_element("id", "generate").is_enabled() and not d.find_element("id", "cancel").is_enabled()
        )
        _screenshot(d, tmp_path / "page-cancelled.png")
