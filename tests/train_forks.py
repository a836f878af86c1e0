"""Run ``train.main`` once per argument list, each in its own process, paying train.py's imports
(~12 s on 2 cores: lightning, torch, torchrl, transformers) once instead of once per run.

Reads a JSON list of argument lists on stdin; imports what train.py imports; then forks one
child per list: the child writes its own stdout and stderr to files and exits with
``train.main``'s return code (1 and the traceback on an uncaught exception), exactly as a
``python train.py ARGS`` process would. Prints a JSON list of {returncode, stdout, stderr}.
Nothing here runs a torch operation before forking, so no thread pool is copied into a child.
Used by tests that make many short runs: bad input, the ablations, the tiny policies' streams.
"""
import json
import os
import sys
import tempfile
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)

# the imports every child would pay
import jsonargparse  # noqa: F401
import lightning.pytorch.cli  # noqa: F401

import datamodules.on_policy  # noqa: F401
import modules.crl_module  # noqa: F401
import train


def run_forked(argv: list[str], tmp: str, timeout: float) -> dict:
    out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: what `python train.py ARGV` does, with its output in two files
        code = 1
        try:
            out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(err, 2)
            signal_alarm(timeout)
            try:
                code = train.main(argv)
            except SystemExit as exit_:  # --print_config, jsonargparse's own exits
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except BaseException:  # noqa: BLE001  (as the interpreter would: traceback, status 1)
                traceback.print_exc()
                code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    with open(out_path) as out, open(err_path) as err:
        return {"returncode": os.waitstatus_to_exitcode(status), "stdout": out.read(), "stderr": err.read()}


def signal_alarm(seconds: float) -> None:
    """A child that hangs is killed by SIGALRM (returncode -14) instead of hanging the tests."""
    import signal

    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(max(1, int(seconds)))


def main() -> None:
    request = json.load(sys.stdin)
    results = []
    for argv in request["runs"]:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run_forked(argv, tmp, request.get("timeout", 300)))
    json.dump(results, sys.__stdout__)


if __name__ == "__main__":
    main()
