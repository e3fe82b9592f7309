"""Start-up time of the `vitp` command and of `import vitp`, against the interpreter and torch alone.

Every command pays its imports before it does anything; heavy libraries (torch, transformers, timm,
faiss, pymilvus, fastapi) belong inside the subcommand that needs them. Baselines measured in the same
run: a bare interpreter (`python -c pass`) and `import torch` (the least a model-running command pays).

    .venv/bin/python benchmarks/startup.py [--repeat 5]

Goals (issue 15): `vitp --help` <= 0.5 s and `import vitp` <= 1.5 s on the 2-core CI machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

GOALS = {"vitp --help": 0.5, "import vitp": 1.5}


def seconds(command: list[str], repeat: int) -> float:
    """Median wall-clock time of a command (one untimed run first, so the file cache is warm)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(command, check=True, capture_output=True, env=environment)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=environment)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def vitp_command() -> list[str]:
    """The console script beside this interpreter, else `python -m vitp.cli`."""
    script = Path(sys.executable).with_name("vitp")
    if script.is_file():
        return [str(script)]
    found = shutil.which("vitp")
    return [found] if found else [sys.executable, "-m", "vitp.cli"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per command (default: %(default)s)")
    args = parser.parse_args()
    python = sys.executable
    vitp = vitp_command()
    commands = {
        "python -c pass": [python, "-c", "pass"],
        "import torch": [python, "-c", "import torch"],
        "import vitp": [python, "-c", "import vitp"],
        "vitp --help": vitp + ["--help"],
        "vitp search --help": vitp + ["search", "--help"],
        "vitp pretrain --help": vitp + ["pretrain", "--help"],
    }
    results = {name: seconds(command, args.repeat) for name, command in commands.items()}
    interpreter, torch_import = results["python -c pass"], results["import torch"]
    print(f"{'command':<22} {'seconds':>8} {'x python':>9} {'x torch':>8}  goal")
    for name, value in results.items():
        goal = GOALS.get(name)
        verdict = "" if goal is None else f"<= {goal} s: {'met' if value <= goal else 'NOT met'}"
        print(f"{name:<22} {value:>8.3f} {value / interpreter:>9.1f} {value / torch_import:>8.2f}  {verdict}")
    return 0 if all(results[name] <= goal for name, goal in GOALS.items()) else 1


if __name__ == "__main__":
    sys.exit(main())
