"""The multi-turn demo driven in a real browser: headless Chromium (Debian's chromium and
chromium-driver packages) through selenium.

The test launches ``multi_turn.build_demo`` on a tiny random llama checkpoint in a thread on a free
port of 127.0.0.1, types two questions into the message box (the first sent with Enter, the second
with the Submit button), waits until each answer, streamed into the chat window, equals what
``MetaModel.generate`` (greedy) gives for that conversation, and saves a screenshot (pytest's tmp
path, and ``$ACCESSORY_SCREENSHOT_DIR`` when set).

What it needs is installed by ``scripts/install_browser.sh`` (run here when something is missing; as
root it apt-get installs chromium and chromium-driver, and pip installs selenium into this Python). The
test skips, with the script's reason, only when that cannot be done. No browser is ever downloaded.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install 'accessory[demo]')")

from accessory.demos import multi_turn  # noqa: E402
from test_demos import CountingStream  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MAX_GEN_LEN = 12          # the response-length slider's value (build_demo's max_seq_len // 2)
STREAM_DELAY_S = 0.08     # per streamed chunk, so the page is seen between chunks
QUESTIONS = ["Name a fruit.", "And a vegetable?"]
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1100"]

# Records every text the chat window's assistant messages show, as the page changes.
OBSERVE_JS = """
window.__botTexts = [];
const record = () => {
  const bots = document.querySelectorAll('[data-testid="bot"]');
  const texts = Array.from(bots, b => b.innerText.replace(/\\s+/g, ' ').trim());
  window.__botTexts.push(texts);
};
new MutationObserver(record).observe(document.body, {subtree: true, childList: true, characterData: true});
"""
BOT_TEXTS_JS = """
return Array.from(document.querySelectorAll('[data-testid="bot"]'),
                  b => b.innerText.replace(/\\s+/g, ' ').trim());
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _norm(text: str) -> str:
    return " ".join(text.split())


def _ensure_browser():
    """Import selenium and check the browser, running scripts/install_browser.sh first if needed; else skip."""
    def ready():
        try:
            import selenium  # noqa: F401
        except ImportError:
            return False
        return os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)

    if not ready():
        script = REPO / "scripts" / "install_browser.sh"
        proc = subprocess.run(["bash", str(script)], env={**os.environ, "PY": sys.executable},
                              capture_output=True, text=True, timeout=900)
        if not ready():
            reason = (proc.stdout + proc.stderr).strip().replace("\n", " | ") or f"exit status {proc.returncode}"
            pytest.skip(f"headless Chromium + chromedriver + selenium unavailable; {script.name} says: {reason}")
    import importlib
    importlib.invalidate_caches()


@pytest.fixture
def browser(tmp_path):
    _ensure_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def served_demo(tiny_llama_model, monkeypatch):
    """The multi-turn page on a free local port: greedy, 12-token answers, each chunk a little delayed."""
    monkeypatch.setattr(multi_turn, "DEFAULT_TEMPERATURE", 0.0)   # the page starts greedy
    original_stream = tiny_llama_model.stream_generate

    def slow_stream(*args, **kwargs):
        for chunk in original_stream(*args, **kwargs):
            time.sleep(STREAM_DELAY_S)
            yield chunk

    monkeypatch.setattr(tiny_llama_model, "stream_generate", slow_stream)  # undone after the test
    demo = multi_turn.build_demo(tiny_llama_model, "default", max_seq_len=2 * MAX_GEN_LEN)
    demo.queue(default_concurrency_limit=1)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def _expected_answer(model, qas):
    prompt, stop = multi_turn.build_conversation_prompt(qas, "default")
    return model.generate([prompt], max_gen_len=MAX_GEN_LEN, temperature=0.0, top_p=multi_turn.DEFAULT_TOP_P,
                          additional_stop_symbols=[stop])[0].strip()


def test_multi_turn_two_turns_in_chromium(browser, served_demo, tiny_llama_model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    first = _expected_answer(tiny_llama_model, [[QUESTIONS[0], None]])
    second = _expected_answer(tiny_llama_model, [[QUESTIONS[0], first], [QUESTIONS[1], None]])
    assert first and second  # a random model still writes something

    browser.set_page_load_timeout(30)
    browser.get(served_demo)
    wait = WebDriverWait(browser, 30, poll_frequency=0.05)
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, 'textarea[placeholder="Type a message and press Enter"]'))
    assert "multi-turn chat demo" in browser.page_source
    browser.execute_script(OBSERVE_JS)

    def answers_are(expected):
        def check(driver):
            texts = driver.execute_script(BOT_TEXTS_JS)
            return texts if [_norm(t) for t in texts] == [_norm(e) for e in expected] else False
        return check

    # turn 1: type, press Enter
    box.click()
    box.send_keys(QUESTIONS[0])
    box.send_keys(Keys.ENTER)
    wait.until(answers_are([first]))

    # turn 2: type, click Submit
    box = browser.find_element(By.CSS_SELECTOR, 'textarea[placeholder="Type a message and press Enter"]')
    wait.until(lambda d: box.get_attribute("value") == "")
    box.click()
    box.send_keys(QUESTIONS[1])
    submit = next(b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Submit")
    submit.click()
    wait.until(answers_are([first, second]))

    # both questions are in the chat window, in order
    users = [_norm(u.text) for u in browser.find_elements(By.CSS_SELECTOR, '[data-testid="user"]')]
    assert users == QUESTIONS

    # each answer was seen growing in the page (streamed), not only whole
    history = browser.execute_script("return window.__botTexts;")
    for index, answer in enumerate((first, second)):
        seen = {_norm(texts[index]) for texts in history if len(texts) > index}
        partial = {text for text in seen if text and text != _norm(answer)}
        assert partial, f"answer {index + 1} never appeared partly written: {sorted(seen)}"
        assert all(_norm(answer).startswith(text) for text in partial), sorted(partial)

    shot = tmp_path / "multi_turn_demo.png"
    assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, len(data)
    if os.environ.get("ACCESSORY_SCREENSHOT_DIR"):
        out = Path(os.environ["ACCESSORY_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, out / shot.name)


# ------------------------------------------------------------------ the Stop button

LONG_GEN_LEN = 160        # an answer long enough to be still streaming when Stop is pressed


def test_multi_turn_stop_button_stops_generation_in_chromium(browser, tiny_llama_model, monkeypatch):
    """Press Stop while an answer streams: the model produces no more tokens and the page stops changing."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    question = "Tell me a long story."
    prompt, stop = multi_turn.build_conversation_prompt([[question, None]], "default")
    full = tiny_llama_model.generate([prompt], max_gen_len=LONG_GEN_LEN, temperature=0.0,
                                     top_p=multi_turn.DEFAULT_TOP_P, additional_stop_symbols=[stop],
                                     return_logprobs=True)[0]
    assert len(full["tokens"]) == LONG_GEN_LEN  # it would run the whole length if not stopped

    monkeypatch.setattr(multi_turn, "DEFAULT_TEMPERATURE", 0.0)
    counter = CountingStream(tiny_llama_model.stream_generate, STREAM_DELAY_S)
    monkeypatch.setattr(tiny_llama_model, "stream_generate", counter)  # undone after the test
    demo = multi_turn.build_demo(tiny_llama_model, "default", max_seq_len=2 * LONG_GEN_LEN)
    demo.queue(default_concurrency_limit=1)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True)
    try:
        browser.set_page_load_timeout(30)
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 30, poll_frequency=0.05)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR,
                                                  'textarea[placeholder="Type a message and press Enter"]'))
        box.click()
        box.send_keys(question)
        box.send_keys(Keys.ENTER)
        # some of the answer is in the page: it is streaming
        wait.until(lambda d: counter.produced >= 5 and any(t for t in d.execute_script(BOT_TEXTS_JS)))
        stop_button = next(b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Stop")
        stop_button.click()
        at_stop = counter.produced
        time.sleep(40 * STREAM_DELAY_S)  # 40 more chunks' time
        after = counter.produced
        shown = browser.execute_script(BOT_TEXTS_JS)
        time.sleep(10 * STREAM_DELAY_S)
        assert browser.execute_script(BOT_TEXTS_JS) == shown  # the page no longer changes
    finally:
        demo.close()
    assert after <= at_stop + 2, (at_stop, after)  # at most the chunk in flight when Stop was pressed
    assert not counter.finished and after < LONG_GEN_LEN // 2
    [answer] = shown
    assert answer and _norm(full["text"]).startswith(_norm(answer)) and len(_norm(answer)) < len(_norm(full["text"]))
