"""Numeric ranges: the bounds of a setting, and the one table of generation option ranges.

`OPTION_RANGES` is read both by the request check (rpc/requests.py) and by the settings that
hold the server's default of the same option (config.py, `option=`), so a default can never
lie outside what a request may ask for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Range:
    """The numbers a value may take: `minimum` inclusive or `above` exclusive, `maximum`
    inclusive: a number, or the name of the setting that holds it. NaN is outside every range.
    """

    minimum: float | None = None
    above: float | None = None
    maximum: float | str | None = None
    finite: bool = False

    def __post_init__(self) -> None:
        if (self.minimum is None) == (self.above is None):
            raise ValueError("a range takes exactly one of minimum and above")
        if self.maximum is not None and self.minimum is None:
            raise ValueError("a range with a maximum takes a minimum")

    def problem(self, value: float, settings: Any, *, name_the_cap: bool = False) -> str | None:
        """Why `value` is out of range ("must be ..."), or None. `settings` supplies a
        maximum given by a setting's name; `name_the_cap` puts that name into the message."""
        cap = getattr(settings, self.maximum) if isinstance(self.maximum, str) else self.maximum
        if self._admits(value, cap):
            return None
        if cap is not None:
            named = name_the_cap and isinstance(self.maximum, str)
            shown = f"{self.maximum} ({cap})" if named else cap
            return f"must be in [{self.minimum}, {shown}]"
        number = "a finite number " if self.finite else ""
        if self.above is not None:
            return f"must be {number}> {self.above}"
        return f"must be {number}>= {self.minimum}"

    def _admits(self, value: float, cap: float | None) -> bool:
        # Written as "not value >= bound" so that NaN fails every comparison.
        if self.finite and not math.isfinite(value):
            return False
        if self.minimum is not None and not value >= self.minimum:
            return False
        if self.above is not None and not value > self.above:
            return False
        return cap is None or value <= cap


#: The most top_k a request may ask for (0 = no cut). More would have the embedded engine
#: sort a whole vocabulary (262k tokens for Gemma) for every token, on the thread every
#: caller shares; the engine treats 0 as this limit too.
TOP_K_MAX = 1000

#: What a request may ask for, per generation option; caps come from the named settings.
OPTION_RANGES: dict[str, Range] = {
    "temperature": Range(minimum=0, finite=True),
    "top_p": Range(minimum=0, maximum=1),
    "top_k": Range(minimum=0, maximum=TOP_K_MAX),
    "max_tokens": Range(minimum=1, maximum="max_tokens_cap"),
    "repeat_penalty": Range(above=0, finite=True),
    "num_ctx": Range(minimum=1, maximum="max_num_ctx"),
}
