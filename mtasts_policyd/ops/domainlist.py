"""Domain list files, as `warm --domains` and `survey FILE` read them: one format, one reader.

One name per line, `#` starts a comment, blank lines are ignored, `-` is standard input. Names
fold like MTA keys (case, trailing dot, IDN to A-label). A line that is not a host name is an
error naming its line: the same hint list must mean the same to every command, and a list that
silently loses lines would undercount.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from mtasts_policyd.core.names import is_ip_literal, to_alabel


class DomainListError(ValueError):
    """The list cannot be used; the message has one line per problem."""


def parse_domain_list(lines: Iterable[str], source: str) -> list[str]:
    """Domains in file order, without duplicates."""
    domains: list[str] = []
    seen: set[str] = set()
    problems: list[str] = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        single = len(text.split()) == 1 and not is_ip_literal(text)
        domain = to_alabel(text) if single else None
        if domain is None:
            problems.append(f"{source}:{number}: not a domain name: {text[:80]!r}")
        elif domain not in seen:
            seen.add(domain)
            domains.append(domain)
    if problems:
        raise DomainListError("\n".join(problems))
    return domains


def read_domain_list(path: str) -> list[str]:
    """Read and parse the list at `path` ("-": standard input)."""
    try:
        if path == "-":
            return parse_domain_list(sys.stdin, "<stdin>")
        with open(path, encoding="utf-8") as handle:
            return parse_domain_list(handle, path)
    except (OSError, UnicodeDecodeError) as exc:
        raise DomainListError(f"cannot read domain list {path}: {exc}") from None
