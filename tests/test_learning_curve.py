"""scripts/learning_curve.py: threshold crossings of a run's rollout success, from TensorBoard."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scripts.learning_curve import first_crossings  # noqa: E402


def test_first_crossings_of_the_trailing_mean():
    curve = [0.2, 0.6, 0.9, 0.9, 0.6, 1.0]
    # trailing means over 3: 0.2, 0.4, 0.567, 0.8, 0.8, 0.833
    hits, last = first_crossings(curve, 3, [0.5, 0.8, 0.9])
    assert hits == [3, 4, None]
    assert abs(last - 2.5 / 3) < 1e-9
    (takeoff,), _ = first_crossings(curve, 1, [0.5])
    assert takeoff == 2


def test_table_from_tensorboard_events(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "m" / "seed0"
    w = SummaryWriter(str(run / "version_0"))
    for step, v in enumerate([0.1, 0.7, 0.9, 0.95, 0.2]):
        w.add_scalar("rollout/success", v, step * 8, walltime=100.0 + step * step)  # gaps 1, 3, 5, 7 s
        w.add_scalar("train/entropy", 1.0 - 0.2 * step, step * 8)
    w.close()
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "learning_curve.py"), str(run),
                          "--thresholds", "0.8", "0.9"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # take-off at iteration 2 (0.7); w3 = 0.1, 0.4, 0.567, 0.85, 0.683
    assert f"| {run} | 2 | 4 | - | 5 | 0.68 |" in res.stdout, res.stdout
    # --mean: entropy over iterations 2..4 = (0.8 + 0.6 + 0.4) / 3
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "learning_curve.py"), str(run),
                          "--thresholds", "0.8", "--mean", "train/entropy", "2", "4"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"| {run} | 2 | 4 | 5 | 0.68 | 0.60 |" in res.stdout, res.stdout
    # --seconds: median gap between iterations 1..3 (1, 3 s) and 2..5 (3, 5, 7 s)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "learning_curve.py"), str(run),
                          "--thresholds", "0.8", "--seconds", "1", "3", "--seconds", "2", "5"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"| {run} | 2 | 4 | 5 | 0.68 | 2.00 | 5.00 |" in res.stdout, res.stdout
    # --span: iterations 3..5 alone (0.9, 0.95, 0.2), renumbered: take-off 1, w3 0.9, 0.925, 0.683
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "learning_curve.py"), str(run),
                          "--thresholds", "0.92", "--span", "3", "5"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"| {run} | 1 | 2 | 3 | 0.68 |" in res.stdout, res.stdout
    empty = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "learning_curve.py"), str(tmp_path / "none")],
                           capture_output=True, text=True)
    assert empty.returncode != 0 and "no TensorBoard events" in empty.stderr
