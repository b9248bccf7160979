"""bench/mutate.py's mutations still point at the code: each snippet is in its file exactly once and each
named test exists (the mutations themselves run with `python bench/mutate.py`, not here)."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_mutations():
    spec = importlib.util.spec_from_file_location("mutate", ROOT / "bench" / "mutate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MUTATIONS


MUTATIONS = load_mutations()


def test_at_least_twelve_mutations_with_distinct_names():
    names = [m.name for m in MUTATIONS]
    assert len(names) >= 12 and len(set(names)) == len(names)


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_each_snippet_is_in_its_file_once_and_its_tests_exist(mutation):
    text = (ROOT / mutation.file).read_text()
    assert text.count(mutation.snippet) == 1, f"{mutation.file} no longer holds {mutation.snippet!r} exactly once"
    assert mutation.replacement != mutation.snippet
    assert mutation.tests
    for node in mutation.tests:
        path, name = node.split("::")
        function = re.sub(r"\[.*\]$", "", name)
        assert re.search(rf"^def {function}\(", (ROOT / path).read_text(), re.MULTILINE), f"no test {node}"
