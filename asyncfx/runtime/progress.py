"""Progress: a line on stderr for each slow piece of work a partitioned model does at its
first calls (capturing, choosing the layout, building the stages), so that a call that
takes seconds says why; ``partition(progress=False)`` keeps them quiet."""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Iterator


@dataclasses.dataclass(frozen=True)
class Progress:
    """Says what is being done and, once done, how long it took (``enabled=False``: nothing).

    Example:
        >>> with Progress().working("capturing UNet2DConditionModel"):
        ...     captured = capture(model, args, kwargs)
        asyncfx: capturing UNet2DConditionModel ... 2.3 s
    """

    enabled: bool = True

    @contextlib.contextmanager
    def working(self, what: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        started = time.perf_counter()
        print(f"asyncfx: {what} ...", end="", file=sys.stderr, flush=True)
        try:
            yield
        except BaseException:
            print(" failed", file=sys.stderr, flush=True)
            raise
        print(f" {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
