"""The docs a newcomer walks: a short README, generated pages that are current, and no link, path or config that
leads nowhere."""

import importlib.util
import re
from pathlib import Path

import pytest
from helpers import REPO

# Every Markdown page a reader is sent to. The benchmarks archive is kept verbatim, so the paths its old logs name
# are history, not instructions: only its links are checked.
PAGES = sorted([REPO / "README.md", REPO / "BENCHMARKS.md", REPO / "slurm" / "README.md", *REPO.glob("docs/**/*.md")])
ARCHIVE = REPO / "docs" / "benchmarks-archive.md"
README_MAX_LINES = 150
# A repository path named in the docs: it starts with one of the repository's top folders (a path inside a link is
# checked as a link instead).
REPO_PATH = re.compile(r"(?<![\w./<>-])((?:lightning_falcon|tests|benchmarks|configs|slurm|scripts|docs)/[\w./*-]*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def generator():
    """scripts/generate_docs.py, imported from its file (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("generate_docs", REPO / "scripts" / "generate_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_code(text: str) -> tuple[list[str], list[str]]:
    """A page's prose lines and its fenced code lines, apart."""
    prose, code, inside = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
        elif inside:
            code.append(line)
        else:
            prose.append(line)
    return prose, code


def anchors(path: Path) -> set[str]:
    """The `#anchor` of each heading, as GitHub makes them: lower case, punctuation dropped, spaces as hyphens, and
    -1, -2, ... after repeats."""
    seen: dict[str, int] = {}
    for line in split_code(path.read_text(encoding="utf-8"))[0]:
        if match := HEADING.match(line):
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match[2])  # a link in a heading counts by its text
            slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_the_readme_is_a_landing_page_of_at_most_150_lines():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, more than {README_MAX_LINES}: move the detail to a page under docs/"
    )


@pytest.mark.parametrize("page", ["docs/reference/touch-points.md", "docs/reference/modules.md"])
def test_a_generated_page_is_what_the_code_generates(page):
    assert generator().stale([page]) == [], f"{page} is stale: run python scripts/generate_docs.py"


def test_the_cli_reference_is_what_each_help_prints():
    gen = generator()
    page = (REPO / gen.CLI_PAGE).read_text(encoding="utf-8")
    versions = gen.help_versions()
    if versions not in page:  # Lightning's Trainer arguments and jsonargparse's layout change with their versions
        pytest.skip(f"{gen.CLI_PAGE} was generated with other library versions than this environment's ({versions})")
    assert gen.stale([gen.CLI_PAGE]) == [], f"{gen.CLI_PAGE} is stale: run python scripts/generate_docs.py"


def test_every_relative_link_leads_to_a_file_and_heading_that_exist():
    broken = []
    for page in PAGES:
        prose = split_code(page.read_text(encoding="utf-8"))[0]
        for line in prose:
            for target in LINK.findall(re.sub(r"`[^`]*`", "``", line)):
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                    continue
                file, _, anchor = target.partition("#")
                path = (page.parent / file).resolve() if file else page
                if not path.exists():
                    broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
                elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                    broken.append(f"{page.relative_to(REPO)}: {target} (no heading #{anchor} in {path.name})")
    assert not broken, "links that lead nowhere:\n" + "\n".join(broken)


def test_every_repository_path_the_docs_name_exists():
    missing = []
    for page in PAGES:
        if page == ARCHIVE:
            continue
        for path in REPO_PATH.findall(page.read_text(encoding="utf-8")):
            path = path.rstrip(".")
            if not (any(REPO.glob(path)) if "*" in path else (REPO / path).exists()):
                missing.append(f"{page.relative_to(REPO)}: {path}")
    assert not missing, "paths named in the docs that the repository lacks:\n" + "\n".join(sorted(set(missing)))


def test_every_config_a_documented_command_names_exists():
    missing = []
    for page in PAGES:
        for value in re.findall(r"--config[= ]+([^\s`'\"]+)", page.read_text(encoding="utf-8")):
            # X.yaml, CONFIG and a run's own runs/.../config.yaml are placeholders, not files of this repository
            if "/" in value and not value.startswith(("runs/", "$", "<")) and not (REPO / value).is_file():
                missing.append(f"{page.relative_to(REPO)}: --config {value}")
    assert not missing, "configs the docs run that do not exist:\n" + "\n".join(missing)


def test_the_readme_installs_and_tests_as_ci_does():
    """`.ci/run` installs exactly as the README says and runs its test commands: each command of its README sections
    is a command line of the README's code blocks."""
    readme_code = split_code((REPO / "README.md").read_text(encoding="utf-8"))[1]
    readme = {" ".join(line.split("#")[0].split()) for line in readme_code}
    ci, section = [], False
    for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").replace("\\\n", " ").splitlines():
        if line.startswith("# ---"):
            section = line.startswith("# --- README")
        elif section and line.strip() and not line.lstrip().startswith("#"):
            ci.append(" ".join(line.split(" || ")[0].split("#")[0].split()))
    assert ci, ".ci/run has no '# --- README' section"
    assert [command for command in ci if command not in readme] == []
