"""The README and docs/: the README's Python snippet and quick commands run as written, the config
reference is what the schema generates, every link resolves, every module command they name exists, and
the doc sections the configs point to exist."""
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import private_cache
from train.config.reference import reference_markdown

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1"}


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"^#{1,6} ", line)}


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= 200


def test_the_config_reference_is_up_to_date():
    """docs/config.md is generated from the schema; regenerate it after changing a key or an objective."""
    assert (ROOT / "docs" / "config.md").read_text() == reference_markdown(), (
        "docs/config.md is out of date: run python -m train.config.reference docs/config.md")


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_link_resolves(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        assert path.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{page.name}: link to {target}: no such section in {path.name}"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_module_command_exists(page):
    """``python -m X`` (and ``-m X`` after torchrun) names a module with a command: in this checkout, or
    once installed (``ccluster_train.X`` is the folder ``train/`` installed, setup.py)."""
    modules = set(re.findall(r"(?:python|torchrun[^`\n]*?) -m ([a-z_]\w*(?:\.\w+)*)", page.read_text()))
    for module in modules - {"venv", "pip", "pytest"}:
        module = re.sub(r"^ccluster_(train|features)\b", r"\1", module)
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{page.name}: python -m {module}: no such module"
        if spec.submodule_search_locations:  # a package: it needs a __main__
            assert importlib.util.find_spec(f"{module}.__main__"), f"{page.name}: python -m {module}: no __main__"


def test_the_doc_sections_the_configs_name_exist():
    named = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        comments = " ".join(line.split("#", 1)[1].strip() for line in path.read_text().splitlines() if "#" in line)
        named += [(path.name, page, title) for page, title in re.findall(r'(docs/[\w-]+\.md): "([^"]+)"', comments)]
    assert len(named) >= 3  # compare.yaml names two, literal.yaml one
    for name, page, title in named:
        assert _slug(title) in _anchors(ROOT / page), f"{name} names the section {title!r} of {page}: not there"


@pytest.mark.slow
def test_the_readme_python_snippet_runs_and_prints_what_it_says(tmp_path):
    (snippet,) = _blocks(README.read_text(), "python")
    expected = [line[2:] for line in snippet.splitlines() if line.startswith("# ")]
    out = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == expected


@pytest.mark.slow
def test_the_readme_quick_commands_run(tmp_path):
    """The commands after `make demo` / `make test`, as written (from the repository root), with the run
    folder and the synthetic cache moved to a temporary folder."""
    commands = [block for block in _blocks(README.read_text(), "bash") if "python -m train fit" in block]
    assert len(commands) == 1
    lines = commands[0].replace("\\\n", " ").splitlines()
    with private_cache(tmp_path / "cache") as cache:
        env = {**ENV, "CCLUSTER_CACHE": str(cache)}
        for line in lines:
            line = line.split("#", 1)[0].strip()
            line = line.replace("runs/", f"{tmp_path}/runs/").replace("~/.cache/ccluster", str(cache))
            argv = shlex.split(line)
            argv[0] = sys.executable if argv[0] == "python" else argv[0]
            out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, f"{line}\n{out.stderr}"
    assert (tmp_path / "runs" / "tiny" / "results.json").is_file()
