"""The package's layers import one way only, with no cycle: the import-linter contracts in pyproject.toml.

commands > training | export > model > data > files | runs > errors | upstream | assets, where `a | b`
means neither imports the other: export works from the adapter directory a fit wrote, never from training's
objects. An import inside a function counts as much as one at the top of a file.
"""

import shutil
import subprocess
import sys
from pathlib import Path

from helpers import REPO


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Check the contracts of `root/pyproject.toml` against the `lightning_falcon` package under `root`."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, env={"PYTHONPATH": str(root)}, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


def test_no_layer_imports_a_higher_one_and_no_module_imports_itself_round_a_cycle():
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in proc.stdout


def test_the_contracts_catch_an_upward_or_sideways_import_and_a_cycle_even_inside_a_function(tmp_path):
    shutil.copytree(REPO / "lightning_falcon", tmp_path / "lightning_falcon", ignore=shutil.ignore_patterns("assets"))
    (tmp_path / "lightning_falcon" / "assets").mkdir()
    (tmp_path / "lightning_falcon" / "assets" / "__init__.py").touch()
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with open(tmp_path / "lightning_falcon" / "data" / "tokenizer.py", "a") as f:
        f.write("\n\ndef planted():\n    from lightning_falcon.model import config  # noqa\n")
    with open(tmp_path / "lightning_falcon" / "training" / "callbacks.py", "a") as f:
        f.write("\n\ndef planted():\n    from lightning_falcon.export import run  # noqa\n")
    with open(tmp_path / "lightning_falcon" / "commands" / "cli.py", "a") as f:
        f.write("\n\ndef planted():\n    from lightning_falcon.commands import evaluate  # noqa\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0 and "Contracts: 0 kept, 2 broken." in proc.stdout, proc.stdout[-4000:]
    assert "lightning_falcon.data.tokenizer -> lightning_falcon.model.config" in proc.stdout
    assert "lightning_falcon.training.callbacks -> lightning_falcon.export.run" in proc.stdout
    assert "No cycles are allowed in lightning_falcon.commands." in proc.stdout
