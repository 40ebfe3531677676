"""Clients' JSON, parsed with a reason for each way it can fail.

json.loads raises ValueError for text that is not JSON, and for valid JSON too: an integer of more digits than
Python converts (sys.get_int_max_str_digits(), 4300; a guard against quadratic conversion), or bytes that are not
UTF-8. Each caller words its own error; the reason says which it was.
"""

from __future__ import annotations

import json
import sys
from typing import Any


class JSONInputError(ValueError):
    """Why a client's JSON was refused: `reason` completes "the request …" ("is not valid JSON", …);
    `not_json`: the text is not JSON at all (not valid syntax, or not UTF-8), as against JSON refused for its
    depth or an integer's length."""

    def __init__(self, reason: str, *, not_json: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.not_json = not_json


def loads(text: str | bytes) -> Any:
    """The parsed value, or JSONInputError."""
    try:
        return json.loads(text)
    except RecursionError:  # the parser recurses once per level: hostile nesting must not kill the reader
        raise JSONInputError("is nested too deeply") from None
    except json.JSONDecodeError:
        raise JSONInputError("is not valid JSON", not_json=True) from None
    except UnicodeDecodeError:
        raise JSONInputError("is not valid JSON (it must be UTF-8 text)", not_json=True) from None
    except ValueError:  # int() refused a literal: the JSON is valid
        limit = sys.get_int_max_str_digits()
        raise JSONInputError(f"has an integer of more than {limit} digits, more than this server reads") from None
