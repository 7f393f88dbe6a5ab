"""Peak memory of ``repedit pairs`` when one history item is huge (issue 17: a 10 MB item once grew the job to 16.5 GB).

Writes a users file with one user whose history holds a ``--item-mb`` MB text (plus two ordinary
items), runs ``python -m repedit pairs`` on it in a child process (one built-in prompt, short answers,
the default input limits), and prints one JSON line: exit status, seconds, peak RSS of that child alone,
whether the truncation warning was printed, and the length of the history text the run kept. Target:
finishes (truncating with a warning) under 3 GB.

The peak is the child's own ``VmHWM`` (``/proc/self/status``), written by the child as it exits. Neither
``RUSAGE_CHILDREN`` (the largest of every child the caller ever waited for, e.g. earlier tests' model
servers) nor ``os.wait4(pid).ru_maxrss`` will do: Linux carries the high-water mark of the image a child
was forked from across ``exec``, so a child of a 4 GB test process reports at least 4 GB whatever it does.
Where the child could not write it (killed by the kernel), the wait4 figure is reported as an upper bound.

    python benchmarks/big_history_item.py                       # default model
    python benchmarks/big_history_item.py --model path/to/tiny  # any model folder (the test uses a tiny one)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Runs ``python -m repedit ARGS...`` after registering an exit handler that writes the process's own peak RSS
# (kB) to the path given as the first argument; exit handlers also run on ``sys.exit`` from the CLI.
_REPORT_PEAK_AND_RUN_REPEDIT = """
import atexit, runpy, sys
peak_path = sys.argv.pop(1)

def write_peak():
    with open("/proc/self/status", encoding="ascii") as status:
        peak_kb = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(peak_path, "w", encoding="ascii") as out:
        out.write(peak_kb)

atexit.register(write_peak)
runpy.run_module("repedit", run_name="__main__", alter_sys=True)
"""


def run(model: str, item_mb: float, work: Path, max_new_tokens: int = 16) -> dict:
    """Run the pairs job on a user with an ``item_mb`` MB history item; return the measurements."""
    users, out = work / "users.jsonl", work / "pairs.jsonl"
    big = ("All work and no play makes a very long history item. " * (int(item_mb * 1e6) // 53 + 1))[: int(item_mb * 1e6)]
    user = {"user_id": "huge_hugo", "history": [{"text": big, "prompt": "Tell me about your day."},
                                                {"text": "Short and sweet!", "prompt": "How are you?"}, {"text": "Yes."}]}
    users.write_text(json.dumps(user) + "\n", encoding="utf-8")
    peak_path = work / "pairs.vmhwm"
    command = [sys.executable, "-c", _REPORT_PEAK_AND_RUN_REPEDIT, str(peak_path), "pairs", "--users", str(users), "--prompts", "demo", "--max-prompts", "1",
               "--out", str(out), "--model", model, "--max-new-tokens", str(max_new_tokens), "--batch-size", "2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    stderr_path = work / "pairs.stderr"
    with open(stderr_path, "wb") as stderr:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        watchdog = threading.Timer(3600, child.kill)  # a job that hangs fails the measurement instead of the session
        watchdog.start()
        # wait4: the fallback figure if the child cannot write its own peak (Popen.wait would reap it without usage).
        _, status, usage = os.wait4(child.pid, 0)
        watchdog.cancel()
        child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if peak_path.exists():
        peak_kb, peak_source = int(peak_path.read_text()), "VmHWM"  # kB
    else:
        peak_kb, peak_source = usage.ru_maxrss, "wait4 (upper bound)"  # Linux: kilobytes
    stderr_text = stderr_path.read_text(encoding="utf-8", errors="replace")
    kept = None
    if out.exists():
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
        real = [r for r in rows if r.get("source") == "real-history" and r["prompt"] == "Tell me about your day."]
        kept = len(real[0]["personalized"]) if real else None
    return {"exit": child.returncode, "seconds": round(seconds, 1), "peak_rss_mb": round(peak_kb / 1024), "peak_source": peak_source,
            "item_chars": len(big),
            "warned": "truncated" in stderr_text, "kept_chars": kept, "stderr_tail": stderr_text[-400:] if child.returncode else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--item-mb", type=float, default=10.0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        print(json.dumps(run(args.model, args.item_mb, Path(work), args.max_new_tokens)))


if __name__ == "__main__":
    main()
