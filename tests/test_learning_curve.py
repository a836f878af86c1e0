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


def test_exported_scalars_give_the_same_table(tmp_path):
    """scripts/run_scalars.py keeps a run's small files and writes scalars.csv from its events;
    learning_curve.py reads the copy exactly as it reads the events."""
    import json

    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "runs" / "m" / "seed0"
    w = SummaryWriter(str(run))
    for step, v in enumerate([0.1, 0.7, 0.9, 0.95, 0.2]):
        w.add_scalar("rollout/success", v, step * 8, walltime=100.0 + step * step)
        w.add_scalar("train/entropy", 1.0 - 0.2 * step, step * 8)
    w.close()
    (run / "metrics.json").write_text(json.dumps({"complete": True, "R": [[0.9]], "b": [0.1]}))
    (run / "config.yaml").write_text("seed_everything: 0\n")
    (run / "R.csv").write_text("0.9\n")
    script = os.path.join(ROOT, "scripts", "run_scalars.py")
    res = subprocess.run([sys.executable, script, str(tmp_path / "runs"), str(tmp_path / "out"),
                          "--tags", "rollout/success", "train/entropy"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    copy = tmp_path / "out" / "m" / "seed0"
    assert sorted(os.listdir(copy)) == ["metrics.json", "scalars.csv"]
    assert (tmp_path / "out" / "m" / "config.yaml").read_text() == "seed_everything: 0\n"
    args = ["--thresholds", "0.8", "--mean", "train/entropy", "2", "4", "--seconds", "2", "5"]
    lc = os.path.join(ROOT, "scripts", "learning_curve.py")
    tables = [subprocess.run([sys.executable, lc, str(d), *args], capture_output=True, text=True).stdout
              for d in (run, copy)]
    assert tables[0].replace(str(run), "RUN") == tables[1].replace(str(copy), "RUN")
    assert "| RUN | 2 | 4 | 5 | 0.68 | 0.60 | 5.00 |" in tables[1].replace(str(copy), "RUN")
    missing = subprocess.run([sys.executable, script, str(tmp_path / "none"), str(tmp_path / "o2")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no run folder" in missing.stderr
