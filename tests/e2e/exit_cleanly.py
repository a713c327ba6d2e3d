"""Run by tests/test_clean_exit.py: runs `pippo ARGS` once in this process, then RUNS times, each
in a child process forked from this one, and prints one JSON line {"exits": {code: count},
"signals": {name: count}, "stderr": [ends of failed runs], "threads_before", "threads_after"}.

threads_before/after: this process's native threads (/proc/self/task) after importing the
libraries whose import starts threads (numpy's OpenBLAS, pyarrow's jemalloc), and after the
in-process run. A thread the command started and left running is alive at interpreter shutdown:
Arrow's thread pools were (their static destructors race them: SIGABRT about one run in 12).

Each child runs the real command (`pipelines.cli.main`) and then leaves through the interpreter's
normal shutdown (SystemExit from the top of its stack: atexit handlers, module teardown, C++ static
destructors) — where a thread still alive at exit aborts the process. The parent imports the
command's modules once, so a run costs the command and its shutdown, not the ~1 s of imports
(50 runs of each read-only command fit in a test). Threads that the command starts — the ones
that can outlive it — start in the child, after the fork.

usage: python tests/e2e/exit_cleanly.py RUNS CWD -- ARGS...
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import tempfile


def main() -> None:
    runs, cwd = int(sys.argv[1]), sys.argv[2]
    argv = sys.argv[sys.argv.index("--") + 1:]
    from pipelines import cli

    args = cli.build_parser().parse_args(argv)
    for name in ("numpy", "pyarrow", "pyarrow.parquet", args.handler.__module__):
        importlib.import_module(name)
    os.chdir(cwd)
    threads_before = len(os.listdir("/proc/self/task"))
    with open(os.devnull, "w") as devnull:
        saved = os.dup(1)
        os.dup2(devnull.fileno(), 1)
        try:
            first = cli.main(argv)     # also the imports the command makes lazily, once for the children
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
    threads_after = len(os.listdir("/proc/self/task"))
    exits: dict[str, int] = {}
    signals: dict[str, int] = {}
    failures: list[str] = []
    for _ in range(runs):
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                raise SystemExit(cli.main(argv))     # unwinds to the top: the full shutdown runs
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status):
                name = signal.Signals(os.WTERMSIG(status)).name
                signals[name] = signals.get(name, 0) + 1
            else:
                code = str(os.WEXITSTATUS(status))
                exits[code] = exits.get(code, 0) + 1
                if code == "0":
                    continue
            err.seek(0)
            failures.append(err.read().decode(errors="replace")[-500:])
    print(json.dumps({"first": first, "exits": exits, "signals": signals, "stderr": failures[:3],
                      "threads_before": threads_before, "threads_after": threads_after}))


if __name__ == "__main__":
    main()
