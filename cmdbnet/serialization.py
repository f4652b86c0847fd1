"""Reading torch files safely: weights only, never code, and errors a user can act on."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from cmdbnet.errors import CmdbError


def safe_torch_load(p: Path, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with whole-sentence errors: refused code, or unreadable file."""
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():
            raise CmdbError(f"{p}: not a readable {what} (truncated, corrupt or not a torch file)") from None
        name = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise CmdbError(f"{p}: refused to load: the file holds Python objects or code, not only weights"
                        + (f" (it calls {name.group(1)})" if name else "")) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = "truncated or damaged" if "zip" in str(exc).lower() or isinstance(exc, EOFError) else \
            f"{type(exc).__name__}"
        raise CmdbError(f"{p}: not a readable {what} ({reason}; was it copied or written completely?)") from None
