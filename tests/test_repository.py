"""The repository stands alone: no tracked text file refers to a path outside it or to a repository
file that does not exist.

Three kinds of reference are checked in every text file git knows (tracked, or new and not ignored):
- a relative path that climbs above the repository root from the file's own folder (`../x` in
  README.md, `../../x` in docs/DECISIONS.md), or stays inside and names nothing; in Python, the
  parent of `ROOT` (the repository root) or of `Path(__file__)` past the root; and any absolute path
  under the development machine's /work tree;
- a markdown link `[text](target)` (relative to the file's folder) that does not exist;
- a repository path such as `docs/RESULTS.md` or `train/losses/` (its first folder is one of the
  repository's top-level folders, it names a file with an extension or ends in `/`; placeholders such
  as `<world>` and globs match any name) that matches nothing, and a document name such as
  `METHODS.md` (capitals) that no file of the repository carries.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]

SELF = "tests/test_repository.py"  # its examples are what the rule must catch
# Hostile inputs that must look like paths: they are test data, not references. file -> the strings.
HOSTILE_INPUTS = {
    "tests/corpus.py": {"../../../../tmp/escaped"},  # a caption shaped like a path escape (test_bad_input.py)
}

MACHINE_PATH = re.compile(r"(?<![\w.:/-])/work/[\w./-]*")
CLIMB = re.compile(r"(?<![\w./-])((?:\.\./)+)([\w.-]*(?:/[\w.-]+)*)")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"(?<![\w./:<>{}*-])((?:[\w.<>{}*-]+/)+(?:[\w<>{}*-][\w.<>{},*-]*\.[A-Za-z]\w*)?)(?![\w/])")
PY_CLIMB = re.compile(r"\bROOT\.parent\b|__file__\)(?:\.resolve\(\))?\.parents\[(\d+)\]")  # ROOT: the repository root
DOC_NAME = re.compile(r"(?<![\w./-])([A-Z][A-Z_]+\.md)\b")


def repository_files() -> list[str]:
    """Paths git knows in this checkout (tracked, or untracked and not ignored), present on disk."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return sorted(p for p in set(listed.decode().split("\0")) if p and (ROOT / p).is_file())


def as_glob(path: str) -> str:
    """`docs/results/<world>/x_{a,b}.json` -> `docs/results/*/x_*.json`."""
    return re.sub(r"<[^>/]*>|\{[^}/]*\}", "*", path)


def exists(path: str, files: list[str]) -> bool:
    """A file, a folder (trailing `/`) or a glob of them, among the repository's files."""
    pattern = as_glob(path.rstrip("/"))
    if path.endswith("/"):
        return any(fnmatch.fnmatch(str(parent), pattern) for f in files for parent in PurePosixPath(f).parents)
    return any(fnmatch.fnmatch(f, pattern) for f in files)


def outside_references(path: str, text: str, files: list[str]) -> list[str]:
    """Every reference in `text` (the content of repository file `path`) that leaves the repository or is missing."""
    folder = PurePosixPath(path).parent
    top = {PurePosixPath(f).parts[0] for f in files if "/" in f}
    names = {PurePosixPath(f).name for f in files}
    found = [m.group(0) for m in MACHINE_PATH.finditer(text)]
    for m in CLIMB.finditer(text):
        resolved = _normalise((folder / m.group(0)).as_posix())
        if resolved.startswith("../") or (m.group(2) and not exists(resolved, files)):
            found.append(m.group(0))
    if path.endswith(".py"):
        found += [m.group(0) for m in PY_CLIMB.finditer(text) if m.group(1) is None or int(m.group(1)) > len(folder.parts)]
    for m in LINK.finditer(text) if path.endswith(".md") else ():
        target = m.group(1).split("#")[0]
        if target and not re.match(r"[a-z]+:", target) and not target.startswith("/"):
            resolved = _normalise((folder / target).as_posix())
            if not resolved.startswith("../") and not exists(resolved, files):  # climbing out: CLIMB's finding
                found.append(m.group(0))
    for m in REPO_PATH.finditer(text):
        candidate = m.group(1)
        if candidate.split("/")[0] in top and (candidate.endswith("/") or "." in candidate.rsplit("/", 1)[-1]):
            if not exists(candidate, files):
                found.append(candidate)
    found += [m.group(1) for m in DOC_NAME.finditer(text) if m.group(1) not in names]
    return [ref for ref in found if ref not in HOSTILE_INPUTS.get(path, set())]


def _normalise(path: str) -> str:
    """`docs/../README.md` -> `README.md` (a link's target, still inside the repository)."""
    parts: list[str] = []
    for part in PurePosixPath(path).parts:
        if part == "..":
            parts.pop() if parts else parts.append(part)
        elif part != ".":
            parts.append(part)
    return "/".join(parts) + ("/" if path.endswith("/") else "")


def read_text(path: str) -> str | None:
    data = (ROOT / path).read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_no_file_refers_outside_the_repository():
    files = repository_files()
    problems = {}
    for path in files:
        text = read_text(path) if path != SELF else None
        if text is not None and (refs := outside_references(path, text, files)):
            problems[path] = sorted(set(refs))
    assert not problems, "references outside the repository or to missing files:\n" + "\n".join(
        f"  {path}: {', '.join(refs)}" for path, refs in problems.items())


def test_the_rule_catches_what_it_is_for():
    files = ["README.md", "docs/RESULTS.md", "docs/results/noise20/a.json", "train/losses/clip.py", "tests/corpus.py"]
    up = "../"
    bad = {
        "README.md": [f"see {up}shared/docs/X.md", "/work/shared/data/list.tsv", "[design](docs/DESIGN.md)",
                      "`docs/DESIGN.md`", "see DEVELOPERS.md", "`train/losses/gone.py`", "`train/gone/`"],
        "docs/RESULTS.md": [f"[x]({up}{up}other/README.md)", "[y](missing.png)"],
        "train/losses/clip.py": [f"# from {up}{up}{up}shared/x", "DATA = Path(__file__).resolve().parents[3] / 'x'"],
        "tests/corpus.py": ['LIST = ROOT.parent / "shared" / "list.tsv"'],
    }
    for path, texts in bad.items():
        for text in texts:
            assert outside_references(path, text, files), (path, text)
    good = {
        "README.md": ["[results](docs/RESULTS.md)", "`docs/results/<world>/`", "`train/losses/*.py`", "RESULTS.md",
                      "https://example.org/../x", "`data/demo/audit/index.html`", "`train.unpaired.images`",
                      "metric train/loss", "[top](#top)"],
        "docs/RESULTS.md": [f"[readme]({up}README.md)", "[run](results/noise20/a.json)"],
        "train/losses/clip.py": [f"# {up}{up}README.md", "ROOT = Path(__file__).resolve().parents[2]"],
        "tests/corpus.py": [f'PATH = "{up}{up}{up}{up}tmp/escaped"', f'"{{base}}/images/{up}{up}etc/passwd"'],
    }
    for path, texts in good.items():
        for text in texts:
            assert not outside_references(path, text, files), (path, text)
