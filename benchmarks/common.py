"""What every benchmark shares: where results go, the machine they ran on, a table printer."""

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(os.environ.get("TSQP_RESULTS_DIR", "results"))


def machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    return path


def png_path(name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}.png"


def markdown_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def finish(name: str, fig, table: str, *notes: str) -> None:
    """Save the plot, print the machine, the table and any notes, and say what was written."""
    fig.tight_layout()
    fig.savefig(png_path(name), dpi=120)
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, gpu {m['gpu']}, torch {m['torch']}, {m['date']}")
    print(table)
    for note in notes:
        print(note)
    print(f"wrote {RESULTS / (name + '.json')} and {png_path(name)}")
