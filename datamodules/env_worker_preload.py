"""What the forkserver of env workers imports once (``RobustEnvPool(start_method="forkserver")``):
torch, tensordict and torchrl, the seconds of imports every spawned worker would repeat.

Not LIBERO or robosuite: importing robosuite starts a native thread (its OpenCV/numba imports),
and a library thread that does not exist in a forked child is the classic fork deadlock;
workers import them after the fork, single-threaded. The one native thread importing torch
starts is the one every fork-started DataLoader worker inherits; Python 3.12 warns about any
such fork ("This process is multi-threaded, use of fork() may lead to deadlocks"), which here
would print once per run to no purpose, so the server ignores that warning.
"""
import warnings

warnings.filterwarnings("ignore", message=r"This process \(pid=\d+\) is multi-threaded, use of fork\(\)",
                        category=DeprecationWarning)

import datamodules.robust_env  # noqa: F401
