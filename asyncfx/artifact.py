"""JSON artifacts (plans, profiles): atomic writes and checked reads."""
from __future__ import annotations

import json
import os
from typing import Any

from asyncfx.errors import PlanError
from asyncfx.outputs import writing


def save_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically: a failed write leaves no partial file."""
    with writing(path, "JSON file") as temporary, open(temporary, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def load_json(path: str | os.PathLike, kind: str, format_name: str, version: int,
              remedy: str) -> dict[str, Any]:
    """The JSON object at ``path`` if it is a ``format_name`` artifact of ``version``;
    otherwise a PlanError that names the file and says ``remedy``."""
    where = repr(os.fspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise PlanError(f"no {kind} at {where}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"{where} is not JSON ({exc}); is it a {kind}?") from exc
    if not isinstance(data, dict) or data.get("format") != format_name:
        raise PlanError(f"{where} is not an asyncfx {kind} (no \"format\": \"{format_name}\"); {remedy}")
    if data.get("version") != version:
        raise PlanError(f"{where} is a {kind} of version {data.get('version')}; this asyncfx reads "
                        f"version {version}. {remedy}")
    return data
