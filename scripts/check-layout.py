#!/usr/bin/env python3
"""Checks the coordinator's layout: the `crate::` edges between its top-level parts.

Every `crate::<part>` path in a part's code (imports, paths in expressions and types; comments
are skipped) is an edge from that part to <part>. An edge not in ALLOWED fails the check, and
ALLOWED itself must have no cycle. The parts are listed bottom-up: a part may import only parts
listed before it (and not all of them: the sets below are what each part needs). `lib.rs` is
the root that wires the parts together and is not checked.

Run: python3 scripts/check-layout.py   (exit status 1 on a violation, with the offending lines)
"""
import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "coordinator", "src")

# Bottom-up. Each part's allowed imports; everything else is a layering violation.
ALLOWED = {
    "clock": set(),
    "metrics": set(),
    "config": set(),
    "domain": {"clock", "config"},
    "openai": {"config", "domain"},
    "policy": {"clock", "config", "domain"},
    "trust": {"clock", "config", "domain", "metrics"},
    "fleet": {"clock", "config", "domain", "metrics", "policy", "trust"},
    "batch": {"clock", "config", "domain", "fleet", "openai", "policy"},
    "http": {"batch", "clock", "config", "domain", "fleet", "metrics", "openai", "policy", "trust"},
    "transport": {"clock", "config", "fleet", "http", "metrics", "trust"},
}
# Items `lib.rs` re-exports at the crate root, and the part each belongs to.
ROOT_ITEMS = {"CoordinatorConfig": "config"}

PATH = re.compile(r"\bcrate::(\{[^}]*\}|\w+)", re.S)


def parts_of(path_text):
    """The top-level parts a `crate::...` path names (a `{...}` group may name several)."""
    if path_text.startswith("{"):
        names = [seg.strip().split("::")[0] for seg in path_text[1:-1].split(",")]
    else:
        names = [path_text]
    return [ROOT_ITEMS.get(n, n) for n in names if n]


def strip_comments(text):
    return re.sub(r"//[^\n]*", "", text)


def part_files(part):
    single = os.path.join(SRC, part + ".rs")
    if os.path.exists(single):
        yield single
    folder = os.path.join(SRC, part)
    for dirpath, _, files in os.walk(folder):
        for f in sorted(files):
            if f.endswith(".rs"):
                yield os.path.join(dirpath, f)


def cycle(graph):
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack + [node, dep]
            if dep not in state:
                found = visit(dep, stack + [node])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in graph:
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def main():
    problems = []
    found = cycle(ALLOWED)
    if found:
        problems.append("the allowed graph has a cycle: " + " -> ".join(found))
    on_disk = {
        name[:-3] if name.endswith(".rs") else name
        for name in os.listdir(SRC)
        if name not in ("lib.rs", "main.rs")
    }
    for part in sorted(on_disk - set(ALLOWED)):
        problems.append(f"crates/coordinator/src/{part}: a part missing from ALLOWED in {__file__}")
    edges = {}
    for part in ALLOWED:
        for path in part_files(part):
            text = strip_comments(open(path, encoding="utf-8").read())
            for match in PATH.finditer(text):
                for dep in parts_of(match.group(1)):
                    if dep == part:
                        continue
                    edges.setdefault((part, dep), []).append(os.path.relpath(path, SRC))
                    if dep not in ALLOWED[part]:
                        line = text[: match.start()].count("\n") + 1
                        rel = os.path.relpath(path, os.path.join(SRC, "..", "..", ".."))
                        problems.append(f"{rel}:{line}: {part} -> {dep} is not allowed (crate::{match.group(1)})")
    if "-v" in sys.argv:
        for (a, b), files in sorted(edges.items()):
            print(f"{a} -> {b}  ({len(set(files))} files)")
    if problems:
        print("coordinator layout check failed:", *problems, sep="\n  ")
        return 1
    print(f"coordinator layout: {len(edges)} edges between {len(ALLOWED)} parts, all allowed, no cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
