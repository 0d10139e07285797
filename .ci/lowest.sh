#!/usr/bin/env bash
# CI: the fast tier again, on the lowest release pyproject.toml allows of each direct dependency (.ci/floors.py),
# in a fresh environment of its own, so that a floor the tests have never run cannot stay in pyproject.toml.
# torch is the build the other tiers use; the rest of the dependencies' dependencies resolve as a user's would.
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir=$(mktemp -d)
trap 'rm -rf "$env_dir"' EXIT
python3 -m venv "$env_dir/venv"
. "$env_dir/venv/bin/activate"
pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# uv holds every floor exactly (--constraint) and says which floor a dependency's own floor rules out.
pip install uv
python .ci/floors.py | tee "$env_dir/floors.txt"
echo "torch==2.13.0" >>"$env_dir/floors.txt"
uv pip install -e ".[dev]" --constraint "$env_dir/floors.txt"
python -m pytest -q --durations=15
