"""llama.cpp itself, for the GGUF tests: llama-cpp-python built on the CPU from its source distribution, once.

The build (minutes on 2 cores) lands in a cache directory named by the version and the Python, so the slow
and scale tiers of a run, and later runs on the same machine, share it. It is installed beside the test
environment (`pip install --target`), never into it, and runs in a child process of its own: llama.cpp
and torch each bring an OpenMP runtime, which one process should not hold twice.

As a script, `python tests/llama_cpp_build.py < REQUEST.json` answers a request read from stdin (see `answer`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

VERSION = "0.3.36"


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning_falcon"
    return root / f"llama-cpp-python-{VERSION}-py{sys.version_info.major}{sys.version_info.minor}"


def built() -> Path:
    """The directory holding the built `llama_cpp` package (building it if no earlier run did)."""
    target = cache_dir()
    if (target / "BUILT").is_file():
        return target
    staging = target.with_name(f"{target.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-binary", "llama-cpp-python",
        "--target", str(staging), f"llama-cpp-python=={VERSION}", "diskcache",
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"building llama-cpp-python {VERSION} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    (staging / "BUILT").write_text(VERSION)
    try:
        staging.rename(target)
    except OSError:  # another run finished first: use its build
        shutil.rmtree(staging, ignore_errors=True)
    return target


def run(request: dict, timeout: float = 600) -> dict:
    """`answer(request)` in a child process running the built llama.cpp."""
    path = built()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, __file__], input=json.dumps(request), capture_output=True, text=True, env=env,
        timeout=timeout, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp failed on {request['model']}:\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def answer(request: dict) -> dict:
    """Load `model` (a GGUF file) in llama.cpp; tokenize each of `texts`; continue each of `prompts` (token
    ids) greedily for at most `new_tokens` tokens, ending at EOS; the logits at every position of each of
    `score` (token ids); the prompt tokens of each of `chats` (lists of messages) as its chat completion renders
    them, through the GGUF's own chat template. Also its vocabulary size and metadata."""
    from llama_cpp import Llama

    scored = request.get("score", [])
    llm = Llama(
        model_path=request["model"],
        n_ctx=request.get("n_ctx", 512),
        n_threads=2,
        verbose=False,
        logits_all=bool(scored),
    )
    eos = llm.token_eos()
    logits = []
    for tokens in scored:  # teacher-forced: the logits at every position of a fixed sequence
        llm.reset()
        llm.eval(tokens)
        logits.append(llm.scores[: len(tokens)].tolist())
    continuations = []
    for prompt in request.get("prompts", []):
        llm.reset()
        tokens = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if token == eos or len(tokens) == request["new_tokens"]:
                break
            tokens.append(token)
        continuations.append(tokens)
    chat_tokens = []
    for messages in request.get("chats", []):
        chat_tokens.append(_chat_prompt(llm, messages))
    return {
        "chat_tokens": chat_tokens,
        "tokens": [
            llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) for text in request.get("texts", [])
        ],
        "continuations": continuations,
        "logits": logits,
        "n_vocab": llm.n_vocab(),
        "eos": eos,
        "metadata": llm.metadata,
    }


def _chat_prompt(llm, messages: list[dict]) -> list[int]:
    """The tokens `create_chat_completion` generates from for `messages`: the formatter `Llama` makes of the GGUF's
    `tokenizer.chat_template` (its default chat format), then the tokenization its chat handler does."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    # Llama took the GGUF's template as its chat format, and builds this formatter of it (Llama.__init__)
    assert llm.chat_format == "chat_template.default", llm.chat_format
    eos, bos = (llm._model.token_get_text(i) for i in (llm.token_eos(), llm.token_bos()))
    result = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos, bos)(messages=messages)
    return llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)


if __name__ == "__main__":
    print(json.dumps(answer(json.loads(sys.stdin.read()))))
