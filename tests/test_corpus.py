"""The test corpus travels with the repository (tests/corpus), byte for byte.

The parser tests read real policies and TXT values whose quirks are in their bytes (CRLF, BOM,
UTF-16, no final newline); a copy that git or an editor "fixed" would test something else.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import CORPUS, ROOT, SHARED_CORPUS


def files(root: Path) -> dict[str, bytes]:
    """Every file below `root` by relative path, except our own .gitattributes."""
    return {str(path.relative_to(root)): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file() and path.name != ".gitattributes"}


@pytest.mark.fast
def test_corpus_is_in_the_repository():
    held = files(CORPUS)
    assert sum(name.startswith("policies/") and name.endswith(".txt") for name in held) == 240
    assert {"README.md", "policies/INDEX.tsv", "txt-records.tsv"} <= set(held)
    # Quirks that a line-ending conversion would destroy are still there.
    assert b"\r\n" in held["policies/0182.txt"] and held["policies/0182.txt"].startswith(b"\xef\xbb\xbf")
    assert held["policies/0186.txt"].startswith(b"\xff\xfe")


@pytest.mark.fast
@pytest.mark.skipif(not SHARED_CORPUS.is_dir(), reason="no ../shared/corpus beside this checkout")
def test_corpus_copy_is_byte_identical_to_the_shared_one():
    assert files(CORPUS) == files(SHARED_CORPUS)


def test_git_never_converts_the_corpus():
    # `* -text`: git stores and checks out these bytes unchanged whatever core.autocrlf says.
    assert (CORPUS / ".gitattributes").read_text().splitlines()[-1] == "* -text"
    try:
        result = subprocess.run(["git", "check-attr", "text", "--", "tests/corpus/policies/0182.txt"],
                                cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        pytest.skip("git is not installed")
    if result.returncode != 0:
        pytest.skip("not a git checkout")
    assert result.stdout.strip().endswith("text: unset")
