"""`python -m lightning_falcon serve --config X --ckpt_path CKPT|last|ADAPTER_DIR`: the model over HTTP.

An OpenAI-compatible server (`/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`) and a chat page
at `/`, in one process on one device: the 4-bit base loads once, with the run's adapter (`tuned`) and any
`--adapters name=DIR`, and a request's `model` picks one of them, or `base` for none. Requests are rendered as
`chat` renders them and answered in batches (`serving/engine.py`).

Built on FastAPI and uvicorn: an asyncio server whose streaming responses are cancelled when their client goes,
which is how a disconnected request frees its place; a single generation thread owns the model.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_falcon.commands.chat import load
from lightning_falcon.commands.cli import SINGLE_DEVICE, FalconCLI, build
from lightning_falcon.errors import ConfigError
from lightning_falcon.model.adapter import check_adapter_dir, read_metadata

TUNED, BASE = "tuned", "base"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class ServeCLI(FalconCLI):
    logs = False

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="A checkpoint, `last`, or an adapter directory, served as model `tuned`",
        )
        parser.add_argument(
            "--adapters",
            nargs="+",
            type=str,
            default=[],
            help="More adapters on the same base, each NAME=DIR, served as model NAME: --adapters a=DIR b=DIR",
        )
        parser.add_argument("--host", type=str, default="127.0.0.1", help="The address to listen on")
        parser.add_argument("--port", type=int, default=8000, help="The port to listen on; 0 picks a free one")
        parser.add_argument("--max_batch_size", type=int, default=8, help="Most sequences generated together")
        parser.add_argument(
            "--max_queue", type=int, default=64, help="Most requests in at once, waiting or answered; one more gets 503"
        )
        parser.add_argument(
            "--batch_wait_ms",
            type=float,
            default=10.0,
            help="How long a batch that is not full waits for more requests before it starts",
        )
        parser.add_argument(
            "--api_key",
            type=str | None,
            default=None,
            help="The name of an environment variable holding the API key every /v1 request must send (never the key)",
        )


def named_adapters(entries: list[str], has_tuned: bool) -> tuple[dict[str, Path], list[str]]:
    """({name: adapter directory} of `--adapters`, problems), checked before anything loads."""
    adapters, problems = {}, []
    for entry in entries:
        name, _, path = entry.partition("=")
        name = name.strip()
        if not name or not path:
            problems.append(f"--adapters entry {entry!r} is not NAME=DIR. Fix: e.g. --adapters a=runs/a/adapter")
        elif name in adapters or name == BASE or (name == TUNED and has_tuned):
            problems.append(f"--adapters name {name!r} is taken. Fix: a name of its own, not base or tuned")
        else:
            try:
                adapters[name] = check_adapter_dir(path)
            except ConfigError as e:
                problems.append(str(e))
    return adapters, problems


def main(args: list[str]) -> None:
    """Check everything cheap, load the base and the adapters once, then serve until interrupted."""
    cli = build(ServeCLI, [*args, *SINGLE_DEVICE], "serve", run=False, save_config_callback=None)
    config = cli.config_init
    source = cli.one_device_source("serve")
    adapters, problems = named_adapters(config["adapters"], source is not None)
    if not 1 <= config["max_batch_size"] <= 256:
        problems.append(f"--max_batch_size must be between 1 and 256, got {config['max_batch_size']}. Fix: e.g. 8")
    if config["max_queue"] < config["max_batch_size"]:
        problems.append(
            f"--max_queue {config['max_queue']} is below --max_batch_size {config['max_batch_size']}: a batch could "
            "never fill. Fix: e.g. --max_queue 64"
        )
    if config["batch_wait_ms"] < 0:
        problems.append(f"--batch_wait_ms must be >= 0, got {config['batch_wait_ms']}. Fix: e.g. 10")
    api_key = None
    if config["api_key"]:
        api_key = os.environ.get(config["api_key"]) or None
        if api_key is None:
            problems.append(
                f"--api_key {config['api_key']}: that variable is unset. Fix: export {config['api_key']}=KEY"
            )
    model, datamodule = cli.model, cli.datamodule
    rendering = datamodule.prompt_format()
    for name, path in adapters.items():
        model.check_checkpoint(path)
        trained = read_metadata(path).get("prompt")
        if trained is not None and trained != rendering:
            problems.append(
                f"adapter {name} ({path}) was trained with another prompt rendering than this config's, and every "
                "request is rendered with the config's. Fix: serve adapters trained with this config's data settings"
            )
    ConfigError.collect(problems)
    listener = listen(config["host"], config["port"])  # a port in use fails now, before the weights load

    load(cli)
    for name, path in adapters.items():
        model.model.load_adapter(str(path), adapter_name=name)
        rank_zero_info(f"[serve] adapter {name} loaded from {path}")
    serve(cli, source, adapters, api_key, listener)


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}. Fix: --port with a free port, or 0") from None
    sock.listen(2048)
    return sock


def serve(cli: ServeCLI, source: Path | None, adapters: dict[str, Path], api_key: str | None, sock) -> None:
    import uvicorn

    from lightning_falcon.serving.app import Served, create_app
    from lightning_falcon.serving.engine import Engine, Sampling

    config, model, datamodule, trainer = cli.config_init, cli.model, cli.datamodule, cli.trainer
    g = model.generation
    models = {TUNED: "default"} if source is not None else {}
    models.update({name: name for name in adapters})
    models[BASE] = None
    served = Served(
        models=models,
        default_model=next(iter(models)),
        format=datamodule.format,
        tokenizer=datamodule.tokenizer,
        context=datamodule.hparams.max_length,
        defaults=Sampling(
            max_tokens=min(g.max_new_tokens, datamodule.hparams.max_length),
            temperature=g.temperature if g.do_sample else 0.0,
            top_p=g.top_p if g.do_sample else 1.0,
        ),
        max_n=config["max_batch_size"],
        api_key=api_key,
    )
    engine = Engine(
        model.model,
        datamodule.tokenizer,
        datamodule.format.reply_marker,
        g.repetition_penalty,
        config["max_batch_size"],
        config["max_queue"],
        config["batch_wait_ms"] / 1000,
        trainer.precision_plugin.forward_context,
    )
    if g.num_beams > 1:
        rank_zero_warn(f"[serve] generation.num_beams {g.num_beams} is not used: serve decodes greedily or samples")
    host, port = sock.getsockname()[:2]
    if config["host"] not in LOCAL_HOSTS:
        rank_zero_warn(
            f"[serve] listening on {config['host']}: other machines can reach the model"
            + ("" if api_key else ". Set --api_key to require a key")
        )
    rank_zero_info(
        f"[serve] models: {', '.join(models)}; batches of up to {config['max_batch_size']} sequences, "
        f"{config['max_queue']} requests in at most"
    )
    where = f"[{host}]" if ":" in host else host
    rank_zero_info(f"[serve] listening on http://{where}:{port} (the chat page at /, the OpenAI API at /v1)")
    engine.start()
    try:
        server = uvicorn.Server(uvicorn.Config(create_app(served, engine), log_level="warning", access_log=False))
        server.run(sockets=[sock])
    finally:
        engine.stop()
