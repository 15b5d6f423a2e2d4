"""What a loaded model holds in memory: a process's resident set, read from /proc (psutil
is not a dependency), and the bytes of the files it was loaded from."""
from __future__ import annotations

from pathlib import Path

# Anonymous memory is what the process allocated (kvflow's tensors); file-backed memory is
# mapped files that have been read (llama.cpp maps its GGUF and reads its weights in place).
_STATUS_FIELDS = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file"}


def process_memory(pid: int | str = "self") -> dict[str, int]:
    """Resident bytes of a Linux process: all of it, and its anonymous and file-backed
    parts."""
    memory = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in _STATUS_FIELDS:
            number, unit = value.split()
            if unit != "kB":
                raise ValueError(f"/proc/{pid}/status: {key} in {unit!r}, expected kB")
            memory[_STATUS_FIELDS[key]] = int(number) * 1024
    return memory


def checkpoint_bytes(model: Path) -> int:
    """The weight files of a checkpoint directory, or a single-file model's size."""
    model = Path(model)
    if model.is_file():
        return model.stat().st_size
    return sum(p.stat().st_size for p in model.glob("*.safetensors"))
