"""The quiesce policy of a snapshot request: its one spelling.

Low in the house on purpose: the configuration, the CLI's parser, the API's
document and the create workflow all name these values.
"""

from __future__ import annotations

import enum


class Quiesce(enum.Enum):
    REQUIRED = "required"  # freeze every running guest, or change nothing
    PREFERRED = "preferred"  # freeze where possible, else crash-consistent
    OFF = "off"  # never freeze


VALUES = tuple(q.value for q in Quiesce)
