"""CSV cells that a spreadsheet shows as text instead of running them as formulas.

A class name, a folder name or a config value written into a CSV as it is can start a formula once the file is opened
in a spreadsheet (``=HYPERLINK(...)``, ``@SUM(...)``, ``+cmd|...``): CSV injection. As OWASP recommends, a text cell
that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading single quote, which spreadsheets
take as "this cell is text" and do not display. Numbers are left alone, negative ones included, also when they arrive
as text (``-0.25`` read back from an earlier CSV), so that numeric columns stay numeric. JSON outputs are never
escaped: their readers are programs, which must see the names exactly.
"""

from __future__ import annotations

import re
from typing import Any

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# a plain decimal number as a CSV cell holds it; "-inf", "1,5" or "-1+1" are text to a spreadsheet
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def spreadsheet_cell(value: Any) -> Any:
    """``value`` escaped for a CSV cell when it is text a spreadsheet would evaluate; any other value as it is."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value

