"""Reading an Exim configuration file far enough to find the pieces of contrib/exim/exim.conf. Pure.

Not an Exim parser (`exim -bV` is the judge of syntax): it joins continued lines, drops comments,
expands the macros the file defines (not those given with -D on Exim's command line) and splits
the router and transport sections into driver instances with their options, so that `doctor`
can check that the MTA-STS router and transport are there and ask this daemon.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_MACRO = re.compile(r"([A-Z][A-Za-z0-9_]*)\s*==?\s*(.*)")
_BEGIN = re.compile(r"begin\s+(\w+)\s*")
_INSTANCE = re.compile(r"([A-Za-z0-9_.-]+)\s*:\s*(.*)")
_OPTION = re.compile(r"(?:no_|not_)?([a-z][a-z0-9_]*)\s*(?:=\s*(.*))?")
_READSOCKET = re.compile(r"\$\{readsocket\{([^}]*)\}")
MACRO_ROUNDS = 10  # macros may use macros; a file that needs more is not one we can read


@dataclass
class Driver:
    """One router or transport: `name:` and the `option = value` lines under it (macros expanded)."""

    name: str
    options: dict[str, str] = field(default_factory=dict)
    text: str = ""  # every option line, expanded, for looking for ${readsocket ...}

    @property
    def readsockets(self) -> list[str]:
        """The socket specifications this driver's expansions ask (`inet:HOST:PORT`, `unix:/path`)."""
        return _READSOCKET.findall(self.text)


@dataclass
class EximConfig:
    macros: dict[str, str] = field(default_factory=dict)
    routers: list[Driver] = field(default_factory=list)  # in order: Exim tries them in this order
    transports: list[Driver] = field(default_factory=list)

    def router(self, name: str) -> Driver | None:
        return next((d for d in self.routers if d.name == name), None)

    def transport(self, name: str) -> Driver | None:
        return next((d for d in self.transports if d.name == name), None)


def logical_lines(text: str) -> list[str]:
    """Lines as Exim reads them: comments dropped, a trailing backslash joins the next line."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip() if pending else raw.rstrip()
        if not pending and line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending)
    return lines


def expand_macros(text: str, macros: dict[str, str]) -> str:
    """Replace macro names by their values, longest names first, as Exim does when it reads a line."""
    names = sorted(macros, key=len, reverse=True)
    for _ in range(MACRO_ROUNDS):
        before = text
        for name in names:
            value = macros[name]
            text = re.sub(rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_])", lambda _match: value, text)
        if text == before:
            break
    return text


def parse(text: str) -> EximConfig:
    config = EximConfig()
    section = "main"
    current: Driver | None = None
    for line in logical_lines(text):
        stripped = line.strip()
        if not stripped or stripped.startswith("."):  # .ifdef/.endif/.include: not followed
            continue
        begin = _BEGIN.fullmatch(stripped)
        if begin:
            section, current = begin.group(1), None
            continue
        if section == "main":
            macro = _MACRO.fullmatch(stripped)
            if macro and macro.group(1) not in config.macros:  # the first definition is the one in force
                config.macros[macro.group(1)] = macro.group(2).strip()
            continue
        if section not in ("routers", "transports"):
            continue
        drivers = config.routers if section == "routers" else config.transports
        instance = _INSTANCE.fullmatch(stripped)
        if instance:
            current = Driver(instance.group(1))
            drivers.append(current)
            stripped = instance.group(2).strip()
            if not stripped:
                continue
        if current is None:
            continue
        expanded = expand_macros(stripped, config.macros)
        current.text += expanded + "\n"
        option = _OPTION.fullmatch(expanded)
        if option:
            current.options[option.group(1)] = (option.group(2) or "").strip()
    return config
