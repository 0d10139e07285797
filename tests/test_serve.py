"""`serve`: a real server process on the tiny model with two real adapters, asked through the official `openai`
client and through raw HTTP for what a client library would refuse to send."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import REPO, TINY, cli, cli_error
from helpers.serving import FIXED_ANSWER, served, two_adapters

pytestmark = pytest.mark.slow
REQUEST = "Midjourney prompt for a fantasy village at night"
CONTEXT = 512  # the servers' data.max_length: long enough that a 512-token answer takes seconds to generate
# greedy, the base goes on to CONTEXT tokens without an EOS: a request that is still generating when its client goes
LONG = {"model": "base", "max_tokens": CONTEXT, "messages": [{"role": "user", "content": REQUEST}]}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    return two_adapters(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    """`tuned` (the Midjourney adapter), `fixed` and `base` on one 4-bit base."""
    root = tmp_path_factory.mktemp("serve")
    args = ["--ckpt_path", str(adapters["prompts"]), "--adapters", f"fixed={adapters['fixed']}"]
    with served(root, *args, "--data.max_length", str(CONTEXT)) as url:
        yield url


def client(url: str, key: str = "none"):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def ask(url: str, model: str, text: str = REQUEST, **kwargs):
    messages = [{"role": "user", "content": text}]
    return client(url).chat.completions.create(model=model, messages=messages, **kwargs)


def raw(url: str, path: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of a POST, whatever its status."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        return json.loads(r.read())


def test_the_openai_client_gets_the_answers_predict_gives_streamed_or_whole(server, adapters, tmp_path):
    c = client(server)
    assert [m.id for m in c.models.list()] == ["tuned", "fixed", "base"]
    whole = ask(server, "tuned", max_tokens=24)
    (choice,) = whole.choices
    # The same rendering and decoding as the project's own predict, on the same adapter.
    out = tmp_path / "predictions.jsonl"
    cli(
        tmp_path, "predict", "--ckpt_path", str(adapters["prompts"]), "--generation.inputs", json.dumps([REQUEST]),
        "--generation.max_new_tokens", "24", "--generation.output", str(out),
    )  # fmt: skip
    predicted = json.loads(out.read_text())
    assert predicted["output"] and choice.message.content.strip() == predicted["output"]
    assert choice.finish_reason == ("stop" if predicted["eos"] else "length")
    assert whole.usage.prompt_tokens == len(rendered_prompt(REQUEST))
    assert whole.usage.completion_tokens == 24 or choice.finish_reason == "stop"

    stream = ask(server, "tuned", max_tokens=24, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(pieces) > 3  # token by token, not one block
    assert "".join(pieces) == choice.message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens

    completion = c.completions.create(model="fixed", prompt=REQUEST, max_tokens=8)
    assert completion.choices[0].text == FIXED_ANSWER and completion.choices[0].finish_reason == "stop"
    several = c.completions.create(model="fixed", prompt=[REQUEST, "mj prompt: a cat"], n=2, max_tokens=8)
    assert [ch.index for ch in several.choices] == [0, 1, 2, 3]  # prompt i's j-th answer is choice i * n + j
    assert {ch.text for ch in several.choices} == {FIXED_ANSWER}
    streamed_text = "".join(
        ch.choices[0].text for ch in c.completions.create(model="fixed", prompt=REQUEST, stream=True)
    )
    assert streamed_text == FIXED_ANSWER


def rendered_prompt(text: str) -> list[int]:
    """The tiny config's rendering of one request (its Alpaca-style `instruction` template)."""
    from helpers import chat_format
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY)
    return chat_format(tokenizer).prompt_ids(tokenizer, text)


def test_two_adapters_answer_concurrent_requests_each_as_it_alone_would(server):
    alone = {m: ask(server, m, max_tokens=16).choices[0].message.content for m in ("tuned", "fixed", "base")}
    assert alone["fixed"] == FIXED_ANSWER
    assert len(set(alone.values())) == 3  # three different models
    before = health(server)["batches"]
    asked = ["tuned", "fixed", "base"] * 4
    with ThreadPoolExecutor(len(asked)) as pool:
        answers = list(pool.map(lambda m: ask(server, m, max_tokens=16).choices[0].message.content, asked))
    assert answers == [alone[m] for m in asked]  # no adapter's weights in another's answer
    assert health(server)["batches"] - before < len(asked)  # they shared batches


def test_sampling_n_stop_and_the_system_prompt(server):
    two = ask(server, "base", max_tokens=12, n=2, temperature=2.0, top_p=0.99)
    assert [c.index for c in two.choices] == [0, 1]
    # sampled from 1,024 tokens at temperature 2: two equal answers of 12 tokens would take a miracle
    assert two.choices[0].message.content != two.choices[1].message.content
    assert all(c.finish_reason == "length" for c in two.choices) and two.usage.completion_tokens == 24
    cut = ask(server, "fixed", max_tokens=8, stop=[" two"])
    assert cut.choices[0].message.content == "forty" and cut.choices[0].finish_reason == "stop"
    system = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": REQUEST}]
    with_system = client(server).chat.completions.create(model="tuned", messages=system, max_tokens=4)
    assert with_system.usage.prompt_tokens > ask(server, "tuned", max_tokens=4).usage.prompt_tokens


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b'{"messages": [', 400, "not valid JSON"),
        ({"model": "tuned"}, 400, "messages"),
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "'nope' is not served here"),
        ({"messages": [{"role": "user", "content": "word " * 900}]}, 400, "longer than this model's context of 512"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 9}, 400, "between 1 and 8 (the batch size), got 9"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens must be between 1"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 513}, 400, "max_tokens must be between 1"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "ending with the user's"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ],
)
def test_a_bad_request_gets_the_openai_error_and_the_server_goes_on(server, body, status, says):
    code, _, answer = raw(server, "/v1/chat/completions", body)
    assert code == status, answer
    assert says in answer["error"]["message"] and answer["error"]["type"]
    assert ask(server, "fixed", max_tokens=8).choices[0].message.content == FIXED_ANSWER


def test_the_prompt_too_long_names_both_lengths(server):
    _, _, answer = raw(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 900}]})
    message = answer["error"]["message"]
    assert "the prompt is " in message and "tokens, longer than this model's context of 512 tokens" in message
    assert answer["error"]["code"] == "context_length_exceeded"


def open_stream(url: str, body: dict, headers: dict | None = None, text: bool = False) -> http.client.HTTPConnection:
    """A streaming request whose first chunk (with `text`: its first text) has arrived; closing the connection is the
    client going away."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    headers = {"Content-Type": "application/json", **(headers or {})}
    connection.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}), headers)
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the role chunk, sent before generation starts
    while text:
        line = response.readline()
        assert line, "the stream ended before any text"
        if b'"content": "' in line and b'"content": ""' not in line:
            break
    return connection


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_gone_mid_answer_stops_its_generation(server, stream):
    before = health(server)
    if stream:
        open_stream(server, LONG, text=True).close()  # while its sequence is being generated
    else:
        parts = urllib.parse.urlsplit(server)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        connection.request("POST", "/v1/chat/completions", json.dumps(LONG), {"Content-Type": "application/json"})
        wait_for(lambda: health(server)["running"] == 1)
        connection.close()  # no answer read: the client gave up waiting
    wait_for(lambda: health(server)["abandoned_sequences"] == before["abandoned_sequences"] + 1)
    after = health(server)
    assert after["abandoned_tokens"] - before["abandoned_tokens"] < CONTEXT  # stopped early
    assert after["admitted"] == 0
    assert ask(server, "fixed", max_tokens=8).choices[0].message.content == FIXED_ANSWER


def test_a_full_queue_answers_503_a_gone_client_frees_its_place_and_the_key_is_required(adapters, tmp_path):
    env = {"LF_TEST_KEY": "sk-serve-test-4242"}
    args = ["--ckpt_path", str(adapters["fixed"]), "--max_batch_size", "1", "--max_queue", "2"]
    with served(tmp_path, *args, "--api_key", "LF_TEST_KEY", "--data.max_length", str(CONTEXT), env=env) as url:
        code, _, answer = raw(url, "/v1/chat/completions", LONG)
        assert code == 401 and answer["error"]["code"] == "invalid_api_key"
        assert health(url)["status"] == "ok"  # needs no key
        key = {"Authorization": "Bearer sk-serve-test-4242"}
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(raw, url, "/v1/chat/completions", LONG, key)  # the one batch slot
            wait_for(lambda: health(url)["running"] == 1)
            waiting = open_stream(url, LONG, key)  # the second and last place
            wait_for(lambda: health(url)["waiting"] == 1)
            code, headers, answer = raw(url, "/v1/chat/completions", LONG, key)
            assert code == 503 and int(headers["retry-after"]) >= 1 and "busy" in answer["error"]["message"]
            waiting.close()  # a client that goes while it waits leaves the queue at once
            wait_for(lambda: health(url)["admitted"] == 1)
            now = health(url)
            assert now["waiting"] == 0 and now["running"] == 1 and now["batches"] == 0  # the first is still running
            later = pool.submit(raw, url, "/v1/chat/completions", {**LONG, "max_tokens": 4}, key)
            assert running.result()[0] == 200 and later.result()[0] == 200
    assert "sk-serve-test-4242" not in (tmp_path / "serve.log").read_text()


def wait_for(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the server never got there"
        time.sleep(0.05)


def test_bad_serve_arguments_fail_in_one_line_before_loading(tmp_path):
    args = ["--adapters", "nope", "--api_key", "LF_UNSET_VARIABLE", "--max_batch_size", "0"]
    error = cli_error(tmp_path, "serve", "--config", str(REPO / "configs" / "tiny.yaml"), *args)
    assert "--adapters entry 'nope' is not NAME=DIR" in error
    assert "--api_key LF_UNSET_VARIABLE: that variable is unset" in error
    assert "--max_batch_size must be between 1 and 256" in error
