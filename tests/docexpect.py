"""``python docexpect.py REGEX FILE``: exit 1 unless FILE's text matches REGEX
(multi-line); the docs tests' check of what a page says a block prints."""

import re
import sys

pattern, path = sys.argv[1], sys.argv[2]
with open(path, encoding="utf-8", errors="replace") as fh:
    text = fh.read()
if not re.search(pattern, text, re.M):
    sys.exit(f"docexpect: {path} does not match {pattern!r}")
