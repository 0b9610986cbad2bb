"""The web page (`GET /`) in a real headless Chromium driven by Selenium, against a real server.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package (`.ci/run` installs
them); skips with the reason when one is absent. The browser never reaches the network: the
page is self-contained and the service listens on 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")

from .serving import SIZE, face_png, generation, register, service, wait_job  # noqa: E402

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


def test_page_registers_generates_and_shows_progress_and_images(browser, tmp_path, one_torch_thread):
    face = tmp_path / "face3.png"
    face.write_bytes(face_png(3))
    with service(tmp_path / "data", api_keys=(KEY,), max_queue=4) as api:
        d = browser
        d.get(api.url + "/")
        assert d.title == "FlashFace-TRT"
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

        # the page sent the prompt, steps, seed and samples it shows: the API, asked the same, agrees
        body = generation(ident["id"], prompt=PROMPT, negative_prompt="", steps=STEPS, seed=SEED)
        again = wait_job(
            client, client.post("/v1/generations", json={**body, "num_samples": SAMPLES}).json()["id"]
        )
        assert [client.get(u).content for u in again["images"]] == [
            client.get(u).content for u in job["images"]
        ]
