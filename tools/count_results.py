#!/usr/bin/env python3
"""Counts test results for tools/test.sh.

usage: count_results.py meson TESTLOG.json    -> prints "passed failed skipped"
       count_results.py junit RESULTS.xml
Meson tests that print TAP (cmocka with CMOCKA_MESSAGE_OUTPUT=TAP) count one
per test case; other meson tests count one each.
"""
import json
import re
import sys
import xml.etree.ElementTree as ET


def meson(path):
    p = f = s = 0
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            t = json.loads(line)
            out = t.get("stdout") or ""
            oks = len(re.findall(r"^ok \d+", out, re.M))
            noks = len(re.findall(r"^not ok \d+", out, re.M))
            res = t.get("result", "")
            if oks + noks:
                p += oks
                f += noks
                if res not in ("OK", "EXPECTEDFAIL") and noks == 0:
                    f += 1  # crashed or timed out after its cases
            elif res in ("OK", "EXPECTEDFAIL"):
                p += 1
            elif res == "SKIP":
                s += 1
            else:
                f += 1
    return p, f, s


def junit(path):
    root = ET.parse(path).getroot()
    p = f = s = 0
    for case in root.iter("testcase"):
        if case.find("skipped") is not None:
            s += 1
        elif case.find("failure") is not None or case.find("error") is not None:
            f += 1
        else:
            p += 1
    return p, f, s


if __name__ == "__main__":
    kind, path = sys.argv[1], sys.argv[2]
    try:
        r = meson(path) if kind == "meson" else junit(path)
    except (OSError, ValueError, ET.ParseError) as e:
        print(f"count_results: {path}: {e}", file=sys.stderr)
        r = (0, 1, 0)
    print(*r)
