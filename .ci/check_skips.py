"""Fail when pytest skipped a test that the allow-list does not name.

usage: python .ci/check_skips.py JUNIT_XML ALLOW_LIST

JUNIT_XML is what `pytest --junitxml` wrote; ALLOW_LIST holds pytest node ids, one a line (`#` starts a comment), or
a test file's path to allow every test in it. A skip at collection (a module-level `pytest.importorskip`, say) counts
like any other. Prints the unexpected skips with their reasons and exits 1 when there are any, else exits 0 silently.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET


def junit_name(node_id: str) -> tuple[str, str]:
    """The (classname, name) pytest's junitxml gives a node id: tests/a.py::C::t[x] -> ("tests.a.C", "t[x]"); a skipped
    module (tests/a.py) -> ("", "tests.a")."""
    path, bracket, params = node_id.partition("[")
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


def allowed(classname: str, name: str, allow: list[str]) -> bool:
    for entry in allow:
        if "::" in entry:
            if junit_name(entry) == (classname, name):
                return True
        else:
            module = junit_name(entry)[1]
            if classname == module or classname.startswith(module + ".") or (classname == "" and name == module):
                return True
    return False


def unexpected_skips(junit_xml: str, allow_list: str) -> list[str]:
    with open(allow_list, encoding="utf-8") as f:
        allow = [line.split("#", 1)[0].strip() for line in f]
    allow = [entry for entry in allow if entry]
    found = []
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        skipped = case.find("skipped")
        if skipped is None:
            continue
        classname, name = case.get("classname", ""), case.get("name", "")
        if not allowed(classname, name, allow):
            test = f"{classname}::{name}" if classname else name
            found.append(f"{test}: {skipped.get('message', '')}")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.splitlines()[2], file=sys.stderr)
        return 2
    found = unexpected_skips(argv[1], argv[2])
    if found:
        print(f"{len(found)} skipped test(s) not in {argv[2]} (a skip fails CI unless allowed there):", file=sys.stderr)
        for line in found:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
