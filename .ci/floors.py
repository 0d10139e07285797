"""Print a pin (`name==floor`) for each direct dependency in pyproject.toml, for `.ci/lowest.sh` to install.

The floor is each requirement's `>=` bound: `[project] dependencies` and the `deepspeed` extra (the tests run
DeepSpeed). torch is left out: the caller installs the build the other tiers use.
"""

import re
import sys
import tomllib
from pathlib import Path

LEFT_OUT = {"torch"}
EXTRAS = ("deepspeed",)


def floors(pyproject: Path) -> list[str]:
    """`name==floor` for every pinned requirement; exits with the fix when one has no `>=` bound."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in EXTRAS:
        requirements += project["optional-dependencies"][extra]
    pins = []
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group()
        if name.lower() in LEFT_OUT:
            continue
        floor = re.search(r">=\s*([^,;\s]+)", requirement)
        if floor is None:
            sys.exit(f"{pyproject}: {requirement!r} has no floor. Fix: give it the `>=` bound .ci/lowest.sh passes on")
        pins.append(f"{name}=={floor.group(1)}")
    return pins


if __name__ == "__main__":
    print("\n".join(floors(Path(__file__).resolve().parent.parent / "pyproject.toml")))
