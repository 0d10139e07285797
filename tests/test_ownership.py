"""Each run-time value has one owner: no object of a run has its attributes set from outside after construction.

The model, data module, trainer, callbacks and generation settings receive what they need when they are made (or
through Lightning's hooks); a command that reaches in and rewires them afterwards is what this test refuses.
"""

import ast
from pathlib import Path

from helpers import REPO

# The names a run's objects go by wherever they are passed around.
RUN_OBJECTS = {"model", "module", "pl_module", "trainer", "datamodule", "dm", "cli", "generation", "callback", "logger"}

# The few attribute writes that are the libraries' own way, each with its reason.
ALLOWED = {
    # chat runs no loop: LightningModule's public `trainer` setter attaches the module to the trainer's strategy
    ("lightning_falcon/commands/chat.py", "model.trainer"),
    # Slurm preemption: Lightning's ModelCheckpoint records where `last.ckpt` went (touch_points.py lists it)
    ("lightning_falcon/training/preemption.py", "callback.last_model_path"),
    # the transformers model being built: no KV cache while training (its config is transformers' to set)
    ("lightning_falcon/model/lora.py", "model.config.use_cache"),
}


def attribute_writes(path: Path) -> list[tuple[int, str]]:
    """(line, dotted target) of each assignment to an attribute reached through a run object in RUN_OBJECTS.

    `self.x` is an object's own, and `config.x` a parsed config before anything is made from it.
    """
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        else:
            continue
        for target in targets:
            for part in ast.walk(target):
                if not isinstance(part, ast.Attribute) or isinstance(getattr(part, "ctx", None), ast.Load):
                    continue
                names = ast.unparse(part).split(".")
                if names[0] not in ("self", "cls", "config") and RUN_OBJECTS & set(names[:-1]):
                    found.append((node.lineno, ".".join(names)))
    return found


def test_no_run_object_is_rewired_from_outside_after_construction():
    package = REPO / "lightning_falcon"
    writes = [
        f"{path.relative_to(REPO)}:{line}: {what}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "upstream.py"  # the reaches into libraries' objects, each registered with its canary
        for line, what in attribute_writes(path)
        if (str(path.relative_to(REPO)), what) not in ALLOWED
    ]
    assert not writes, "set from outside its object after construction:\n" + "\n".join(writes)


def test_the_checkpoint_to_run_from_is_settled_in_one_place():
    """`--ckpt_path` is resolved once (cli.py) and handed to Lightning once; no logger list is emptied afterwards."""
    sources = {p: p.read_text() for p in (REPO / "lightning_falcon").rglob("*.py")}
    rewrites = [p for p, text in sources.items() for _ in range(text.count('["ckpt_path"] ='))]
    assert len(rewrites) == 1, rewrites
    assert not [p for p, text in sources.items() if "loggers = " in text]


def test_the_check_sees_a_write_from_outside(tmp_path):
    rewired = tmp_path / "rewired.py"
    rewired.write_text("def run(cli):\n    cli.model.generation = None\n    trainer.loggers = []\n")
    assert attribute_writes(rewired) == [(2, "cli.model.generation"), (3, "trainer.loggers")]
