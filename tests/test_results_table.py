"""scripts/results_table.py on hand-made metrics.json files."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(d, R, b, metrics, complete=True, wall=60.0, curves=(), file="metrics.json"):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, file), "w") as f:
        json.dump({"complete": complete, "R": R, "b": b, "metrics": metrics, "curves": list(curves)}, f)
    with open(os.path.join(d, "wall_s.txt"), "w") as f:
        f.write(f"{wall}\n")


def test_table_means_and_spreads(tmp_path):
    m = {"FAR": 0.5, "BWT": -0.2, "F": 0.2, "FT": 0.0, "FWT": 0.8, "NBT": 0.2, "AUC": 0.6}
    _write(tmp_path / "crl" / "seed0", [[0.8, 0.1], [0.6, 0.9]], [0.1, 0.1], m, wall=120)
    _write(tmp_path / "crl" / "seed1", [[1.0, 0.1], [0.8, 0.7]], [0.3, 0.1], dict(m, FAR=0.7), wall=180)
    _write(tmp_path / "seq_ft" / "seed0", [[0.5, 0.0], [None, None]], [0.1, 0.1], m, complete=False)
    out = tmp_path / "table.md"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "results_table.py"),
                          str(tmp_path), "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| crl |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # method, seeds, mean b, R[0,0], R[1,1], FAR, ...; std is the sample std (ddof=1)
    assert cells[:5] == ["crl", "2", "0.15 ± 0.07", "0.90 ± 0.14", "0.80 ± 0.14"]
    assert cells[5] == "0.60 ± 0.14"  # FAR 0.5, 0.7
    assert cells[-1] == "2.50 ± 0.71"  # wall 2 and 3 minutes
    assert "| 1 | 0.70 | 0.80 |" in text  # mean R row after task 1
    assert "| crl | 0.60 0.90 (0.50 / -0.20 / 0.20) | 0.80 0.70 (0.70 / -0.20 / 0.20) |" in text  # per seed
    assert "seq_ft/seed0" in text and "| seq_ft |" not in text  # incomplete: listed, not averaged


def test_learning_curve_table(tmp_path):
    m = {k: 0.0 for k in ("FAR", "BWT", "F", "FT", "FWT", "NBT", "AUC")}
    for seed, (a, b) in enumerate([(0.2, 0.8), (0.4, 0.9)]):
        curves = [{"iteration": 10, "task_trained": 0, "success": [a], "task_end": False},
                  {"iteration": 20, "task_trained": 0, "success": [b], "task_end": True}]
        _write(tmp_path / "vla_rl" / f"seed{seed}", [[b]], [0.1], m, curves=curves)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "results_table.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "| method | it 10 | it 20 |" in res.stdout
    assert "| vla_rl | 0.30 ± 0.14 | 0.85 ± 0.07 |" in res.stdout


def test_table_without_runs_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "results_table.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "no complete metrics.json" in res.stderr


def test_metrics_file_reads_the_second_evaluation(tmp_path):
    """--metrics_file metrics_greedy.json tabulates the runs' greedy evaluation, not metrics.json."""
    m = {k: 0.0 for k in ("FAR", "BWT", "F", "FT", "FWT", "NBT", "AUC")}
    _write(tmp_path / "crl" / "seed0", [[0.9]], [0.3], m)
    _write(tmp_path / "crl" / "seed0", [[0.7]], [0.1], m, file="metrics_greedy.json")
    script = os.path.join(ROOT, "scripts", "results_table.py")
    main = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True)
    greedy = subprocess.run([sys.executable, script, str(tmp_path), "--metrics_file", "metrics_greedy.json"],
                            capture_output=True, text=True)
    assert main.returncode == 0 and greedy.returncode == 0, main.stderr + greedy.stderr
    assert "| crl | 1 | 0.30 | 0.90 |" in main.stdout
    assert "| crl | 1 | 0.10 | 0.70 |" in greedy.stdout
    missing = subprocess.run([sys.executable, script, str(tmp_path), "--metrics_file", "metrics_x.json"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no complete metrics_x.json" in missing.stderr


def test_first_tasks_scores_runs_cut_short(tmp_path):
    """--tasks 1 keeps a run whose R has only row 0, with metrics recomputed on the corner."""
    m = {k: 0.0 for k in ("FAR", "BWT", "F", "FT", "FWT", "NBT", "AUC")}
    _write(tmp_path / "seq_ft" / "seed0", [[0.5, 0.0], None], [0.1, 0.3], m, complete=False)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "results_table.py"),
                          str(tmp_path), "--tasks", "1"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    row = next(line for line in res.stdout.splitlines() if line.startswith("| seq_ft |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:5] == ["seq_ft", "1", "0.10", "0.50", "0.50"]  # b, R[0,0], FAR (one seed: no spread)


def test_plots_from_the_committed_quickstart_runs(tmp_path):
    """scripts/plots.py on docs/data/quickstart: per-iteration curves read back from each run's
    scalars.csv (3 tasks x 30 iterations per run) and two PNGs written."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import plots

    runs = plots.load([os.path.join(ROOT, "docs", "data", "quickstart")])
    assert set(runs) == {"crl", "seq_ft"} and all(len(rs) == 6 for rs in runs.values())
    for rs in runs.values():
        for r in rs:
            assert len(r["train_success"]) == 90
            assert 0.0 <= r["train_success"].min() and r["train_success"].max() <= 1.0
    paths = plots.plot(runs, str(tmp_path))
    from PIL import Image
    for p in paths:
        w, h = Image.open(p).size
        assert w > 300 and h > 200


def test_labelled_sweep_of_another_stream_in_the_same_table(tmp_path):
    """``LABEL=path``: a longer stream's methods join the table as ``method [LABEL]``."""
    m = {k: 0.0 for k in ("FAR", "BWT", "F", "FT", "FWT", "NBT", "AUC")}
    _write(tmp_path / "a" / "crl" / "seed0", [[0.8, 0.1], [0.6, 0.9]], [0.1, 0.1], m)
    R3 = [[0.5, 0.0, 0.0], [0.4, 0.7, 0.0], [0.3, 0.6, 0.9]]
    _write(tmp_path / "b" / "crl" / "seed0", R3, [0.1, 0.1, 0.1], dict(m, FAR=0.6))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "results_table.py"),
                          str(tmp_path / "a"), f"long={tmp_path / 'b'}"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rows = {}
    for line in res.stdout.splitlines():  # the main table comes first (per-seed rows follow)
        if line.startswith("| crl"):
            rows.setdefault(line.split("|")[1].strip(), [c.strip() for c in line.strip("|").split("|")])
    assert rows["crl"][3:6] == ["0.80", "0.90", "-"]
    assert rows["crl [long]"][3:7] == ["0.50", "0.70", "0.90", "0.60"]
    assert "| 2 | 0.30 | 0.60 | 0.90 |" in res.stdout  # the long stream's own mean R


def test_bootstrap_intervals_and_differences(tmp_path):
    """--ci: mean [95% bootstrap interval] per method; --compare A=B: the difference of means."""
    sys.path.insert(0, ROOT)
    from scripts.results_table import bootstrap_ci

    m = {"FAR": 0.5, "BWT": -0.2, "F": 0.2, "FT": 0.0, "FWT": 0.8, "NBT": 0.2, "AUC": 0.6}
    for s, far in enumerate((0.6, 0.8, 0.7)):
        _write(tmp_path / "crl" / f"seed{s}", [[0.8, 0.1], [0.6, 0.9]], [0.1, 0.1], dict(m, FAR=far))
        _write(tmp_path / "lwf" / f"seed{s}", [[0.8, 0.1], [0.6, 0.9]], [0.1, 0.1], dict(m, FAR=0.5))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "results_table.py"), str(tmp_path),
                          "--ci", "--compare", "crl=lwf"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    mean, lo, hi = bootstrap_ci([0.6, 0.8, 0.7])
    # the bootstrap interval of 3 seeds spans the resampled means: within [min, max], around the mean
    assert abs(mean - 0.7) < 1e-9 and 0.6 - 1e-9 <= lo < 0.7 < hi <= 0.8 + 1e-9
    assert f"| crl | 3 | 0.70 [{lo:.2f}, {hi:.2f}] |" in res.stdout
    assert "| lwf | 3 | 0.50 [0.50, 0.50] |" in res.stdout  # no spread, no interval
    assert f"| crl - lwf | +0.20 [{lo - 0.5:+.2f}, {hi - 0.5:+.2f}] |" in res.stdout
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "results_table.py"), str(tmp_path),
                          "--compare", "crl=ewc"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --compare='crl=ewc'")


def test_paired_differences_resample_the_seeds_together(tmp_path):
    """--paired --compare A=B: the mean per-seed difference over the seeds both ran; a constant
    per-seed difference has no spread even when the seeds spread widely."""
    m = {"BWT": -0.2, "F": 0.2, "FT": 0.0, "FWT": 0.8, "NBT": 0.2, "AUC": 0.6}
    for s, far in enumerate((0.3, 0.9, 0.6)):
        _write(tmp_path / "crl" / f"seed{s}", [[0.8, 0.1], [0.6, 0.9]], [0.1, 0.1], dict(m, FAR=far))
        _write(tmp_path / "lwf" / f"seed{s}", [[0.8, 0.1], [0.6, 0.9]], [0.1, 0.1], dict(m, FAR=far - 0.1))
    _write(tmp_path / "lwf" / "seed3", [[0.8, 0.1], [0.6, 0.9]], [0.1, 0.1], dict(m, FAR=0.0))  # crl has no seed 3
    script = os.path.join(ROOT, "scripts", "results_table.py")
    paired = subprocess.run([sys.executable, script, str(tmp_path), "--ci", "--compare", "crl=lwf", "--paired"],
                            capture_output=True, text=True)
    assert paired.returncode == 0, paired.stderr
    assert "| crl - lwf | 3 | +0.10 [+0.10, +0.10] |" in paired.stdout
    unpaired = subprocess.run([sys.executable, script, str(tmp_path), "--ci", "--compare", "crl=lwf"],
                              capture_output=True, text=True)
    row = next(line for line in unpaired.stdout.splitlines() if line.startswith("| crl - lwf |"))
    mean, lo, hi = (float(x) for x in row.split("|")[2].replace("[", "").replace("]", "").replace(",", "").split())
    assert abs(mean - (0.6 - 0.375)) < 0.006 and hi - lo > 0.3  # seed 3 counts; the seeds' spread shows
    _write(tmp_path / "ewc" / "seed7", [[0.8, 0.1], [0.6, 0.9]], [0.1, 0.1], dict(m, FAR=0.5))
    bad = subprocess.run([sys.executable, script, str(tmp_path), "--compare", "crl=ewc", "--paired"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --paired --compare=crl=ewc: the two methods share no seed"
