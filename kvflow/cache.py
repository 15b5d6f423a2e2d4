"""Where kvflow keeps what it builds, measures or resolves once per machine."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$KVFLOW_CACHE or ~/.cache/kvflow."""
    return Path(os.environ.get("KVFLOW_CACHE") or Path.home() / ".cache" / "kvflow")


def write_atomically(path: Path, text: str) -> None:
    """Readers in other processes see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)
