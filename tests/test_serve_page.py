"""`serve`'s chat page (lightning_falcon/serving/page.html) in a real browser: Debian's headless Chromium driven
through Playwright, against a real server of the tiny chat model with two adapters that answer differently."""

import json
import urllib.request
from pathlib import Path

import pytest
from helpers.serving import served

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (.ci/run installs it); Playwright's own browsers are not used
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
QUESTION, ANOTHER = "What is the capital of Italy?", "Write a haiku about rain."
SYSTEM = "Answer in one word."

# Skipped here rather than inside the test, so that a machine without Chromium trains nothing for it.
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs {CHROMIUM}: apt-get install chromium")


def get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


@pytest.fixture
def server(chat_trained, chat_fit, tmp_path):
    """`serve` on tiny-chat.yaml: "tuned" is the 200-step adapter (it answers in words), "early" the 10-step one.

    The chat config, not the two adapters of helpers.serving: a system prompt needs a chat template."""
    early = f"early={chat_fit / 'adapter'}"
    with served(
        tmp_path, "--ckpt_path", str(chat_trained / "adapter"), "--adapters", early, config="tiny-chat.yaml"
    ) as url:
        yield url


# Records, at each change of the conversation, the last answer's length and whether it was still streaming (Stop
# enabled). Read when the observer runs, so pieces that arrived in one network read show as one step.
WATCH = """() => {
    window.seen = [];
    new MutationObserver(() => {
        const answers = document.querySelectorAll("#log .assistant");
        const last = answers[answers.length - 1];
        window.seen.push([last ? last.textContent.length : 0, !document.querySelector("#stop").disabled]);
    }).observe(document.querySelector("#log"), {childList: true, subtree: true, characterData: true});
}"""


class Chat:
    """The page, and the request bodies it POSTs to /v1/chat/completions."""

    def __init__(self, page, url: str):
        self.page, self.url, self.sent = page, url, []
        page.on("request", self.record)

    def record(self, request) -> None:
        if request.url.endswith("/v1/chat/completions"):
            self.sent.append(json.loads(request.post_data))

    def ask(self, text: str) -> tuple[str, dict, list]:
        """Send `text` and wait for the whole answer: (its text, the request's body, what the observer saw)."""
        page, count = self.page, self.page.locator("#log .assistant").count()
        page.evaluate("() => { window.seen = []; }")
        page.fill("#message", text)
        page.click("#send")  # Stop is enabled before the click returns, and disabled again when the answer ends
        page.wait_for_function("document.querySelector('#stop').disabled")
        assert page.is_hidden("#error"), page.text_content("#error")
        assert page.locator("#log .assistant").count() == count + 1
        answer = page.locator("#log .assistant").last.text_content()
        return answer, self.sent[-1], page.evaluate("() => window.seen")

    def whole(self, body: dict) -> str:
        """What the server answers for `body` without streaming (greedy: the run's generation settings)."""
        return post(self.url + "/v1/chat/completions", {**body, "stream": False})["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_the_page_streams_answers_of_the_chosen_adapter_with_the_system_prompt_until_reset(server):
    from playwright.sync_api import sync_playwright

    ids = [model["id"] for model in get(server + "/v1/models")["data"]]
    assert ids[:2] == ["tuned", "early"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda error: errors.append(error))
            page.goto(server + "/")
            page.wait_for_function("document.querySelector('#model').options.length > 0")
            assert page.eval_on_selector_all("#model option", "options => options.map(o => o.value)") == ids
            assert page.input_value("#model") == "tuned"  # the first id, the server's default
            page.evaluate(WATCH)
            chat = Chat(page, server)

            answer, body, seen = chat.ask(QUESTION)
            assert body == {"model": "tuned", "messages": [{"role": "user", "content": QUESTION}], "stream": True}
            assert answer and answer == chat.whole(body)
            # The answer grew in the page, in more than one step, before its stream ended.
            assert any(0 < length < len(answer) and streaming for length, streaming in seen), seen

            # Another adapter continues the same conversation: the whole history goes with the next question.
            page.select_option("#model", "early")
            second, body, _ = chat.ask(ANOTHER)
            assert body["model"] == "early"
            assert body["messages"] == [
                {"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer},
                {"role": "user", "content": ANOTHER},
            ]  # fmt: skip
            assert second == chat.whole(body) != chat.whole({**body, "model": "tuned"})

            # After a reset only the new exchange goes, the system prompt first.
            page.click("#reset")
            assert page.locator("#log > *").count() == 0
            page.select_option("#model", "tuned")
            page.fill("#system", SYSTEM)
            third, body, _ = chat.ask(QUESTION)
            assert body["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
            assert third == chat.whole(body) != answer  # the system prompt changes the answer
            assert [e.text_content() for e in page.locator("#log > *").all()] == [QUESTION, third]
            assert page.locator("#log > .user").count() == page.locator("#log > .assistant").count() == 1

            page.click("#reset")
            assert page.locator("#log > *").count() == 0
            assert errors == []
        finally:
            browser.close()
