"""A fork server for the tests' ``train.py`` runs: it does train.py's imports once (lightning,
torch, torchrl, transformers: seconds on a small CPU), then runs ``train.main`` once per request, each
in a child forked from it, instead of paying the imports in a fresh process per run.

Protocol: one JSON object per line on stdin, ``{"argv": [...], "timeout": s, "env": {...}}``;
one JSON line back per request, ``{"returncode", "stdout", "stderr"}``; the server ends at EOF.
The answers go to the file descriptor that was stdout when the server started; the server's
own stdout then points at its stderr, so nothing a library prints can corrupt an answer.

A child does what a ``python train.py ARGV`` process would: it takes the requester's
environment variables (``env``), train.py's command line and main module (what spawned and
forkserver workers import again), writes its stdout and stderr to files of its own, exits with
``train.main``'s return code (1 and the traceback on an uncaught exception), and is killed by
SIGALRM after ``timeout`` seconds (returncode -14). Nothing here runs a torch operation before
forking, so no thread pool is copied into a child. Runs that start processes by re-running
their own command line (DDP's launcher) cannot be served: those tests start ``train.py``
themselves (``tests/conftest.py``, ``run_train(fresh=True)``).
"""
import json
import os
import sys
import tempfile
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
os.chdir(ROOT)

# the imports every child would pay
import jsonargparse  # noqa: F401
import lightning.pytorch.cli  # noqa: F401

import datamodules.on_policy  # noqa: F401
import modules.crl_module  # noqa: F401
import train


def run_forked(argv: list[str], tmp: str, timeout: float, env: dict | None, answers_fd: int) -> dict:
    out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: what `python train.py ARGV` does, with its output in two files
        code = 1
        try:
            os.close(answers_fd)
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            # as in `python train.py ARGV`: the command line, and the main module that spawned and
            # forkserver workers import again (not this script, whose imports they do not need)
            sys.argv = [os.path.join(ROOT, "train.py"), *argv]
            sys.modules["__main__"] = train
            out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(err, 2)
            signal_alarm(timeout)
            try:
                code = train.main()  # reads sys.argv, as train.py's own entry point
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


def serve() -> None:
    answers_fd = os.dup(1)
    os.dup2(2, 1)
    with os.fdopen(answers_fd, "w") as answers:
        for line in sys.stdin:
            request = json.loads(line)
            with tempfile.TemporaryDirectory() as tmp:
                result = run_forked(request["argv"], tmp, request.get("timeout", 300), request.get("env"), answers_fd)
            answers.write(json.dumps(result) + "\n")
            answers.flush()


if __name__ == "__main__":
    serve()
