"""``volume limits``: a volume's limits shown, or changed with one API call."""

from __future__ import annotations

import argparse
from typing import Any

from .commands import _client, _quote, _show

UNSET: Any = object()  # a flag not given (None is "back to the default")

# flag -> the limit it sets (the API's names, gluster's)
FLAGS = {"max": "max_snapshots", "soft": "soft_limit_percent", "auto_delete": "auto_delete",
         "max_depth": "max_chain_depth"}


def limit_number(text: str) -> int | None:
    """A flag's value: a number, or ``default`` (the agent's [limits])."""
    if text == "default":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'default'") from None


def limit_switch(text: str) -> bool | None:
    choices = {"on": True, "off": False, "default": None}
    if text not in choices:
        raise argparse.ArgumentTypeError("on, off or default")
    return choices[text]


def _human(doc: dict[str, Any]) -> None:
    own = set(doc["own"])
    for key in FLAGS.values():
        value = doc[key]
        shown = ("on" if value else "off") if isinstance(value, bool) else str(value)
        print(f"{key:<20}{shown:<8}{'(this volume)' if key in own else '(default)'}")
    depth = doc["chain_depth"]
    print(f"{'snapshots':<20}{doc['snapshots']:<8}(soft limit {doc['soft_snapshots']})")
    print(f"{'chain_depth':<20}{'-' if depth is None else depth:<8}"
          f"(soft limit {doc['soft_chain_depth']})")


def volume_limits(args: argparse.Namespace) -> int:
    path = f"/v1/volumes/{_quote(args.volume)}/limits"
    change = {limit: getattr(args, flag) for flag, limit in FLAGS.items()
              if getattr(args, flag) is not UNSET}
    client = _client(args)
    doc = client.request("PUT", path, change) if change else client.get(path)
    _show(args, doc, _human)
    return 0

