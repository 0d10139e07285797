"""`python -m lightning_falcon export`: ship a trained adapter, a merged model any transformers user can load,
or the merged model as one GGUF file for llama.cpp and Ollama. The work is `lightning_falcon/export/`'s.

python -m lightning_falcon export --adapter runs/tiny/version_0/adapter --output out --merge
python -m lightning_falcon export --adapter runs/tiny/version_0/adapter --output out-gguf --format gguf
"""

from __future__ import annotations

from lightning_falcon.commands.cli import FalconArgumentParser
from lightning_falcon.commands.program import program
from lightning_falcon.export.run import export


def main(args: list[str]) -> None:
    """`export`: an adapter directory exported, or merged into its base."""
    parser = FalconArgumentParser(prog=f"{program()} export", description=export.__doc__.splitlines()[0])
    parser.add_function_arguments(export)
    # `--merge` alone reads as `--merge true`, as with argparse's store_true flags.
    flags = ("--merge", "--overwrite", "--private", "--trust_remote_code")
    args = [
        f"{a}=true" if a in flags and (i + 1 == len(args) or args[i + 1].startswith("-")) else a
        for i, a in enumerate(args)
    ]
    config = parser.parse_args(args)
    export(**config.as_dict())
