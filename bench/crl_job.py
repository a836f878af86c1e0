"""The real job, shortened, on one GPU: ``configs/crl.yaml`` (OpenVLA-7B shape, LoRA r32, LIBERO-Goal)
for CRL and Seq-FT over 2 tasks x a few iterations, and ``configs/vla_rl.yaml`` on one GPU with its
RPRM on, with the kit's own timing breakdown as a table.

Each run is ``python train.py --config <crl.yaml with the overrides below>`` in a subprocess; the
numbers are what the kit logs itself (``timings.json``, callbacks/iteration_timing.py), the same
breakdown every run of the kit logs. Overrides: the random-weight checkpoint (written first if
missing, bench/random_openvla_checkpoint.py), 2 tasks (LIBERO-Goal 8 and 1), ``--iterations`` per
task, ``--frames`` per iteration (minibatches of 64), a short evaluation (``--eval_episodes``
episodes of at most ``--eval_steps`` steps per task, no videos), no periodic checkpoints. Method
``seq_ft`` runs no continual-learning method (``method: null``). Variant ``speed_off`` turns the speed
settings off (float32 LoRA branches, gradient checkpointing, the whole minibatch in one forward) with
anchor targets in chunks of 64 (chunks of 1024 run out of memory); ``shipped`` runs the config as it is;
``--set KEY=VALUE`` overrides more keys.

Method ``vla_rl`` runs ``configs/vla_rl.yaml`` with ``trainer.devices`` 1 (its 8 GPUs overridden) on
the same LIBERO-Goal tasks, laid out as that config does: every iteration collects all tasks (env i
on task i mod K) and TaskSwitch cuts training into one block of ``--iterations`` iterations per
task, each followed by an evaluation. Same random policy checkpoint; the RPRM on: a second VLM of
the policy's shape (the same random base) with an untrained LoRA (B = 0) and a random head, written
as an RPRM checkpoint first (adapters and head, the frozen base referenced); its scoring of every
rollout frame is ``time/reward_shaping``.

Reported per method: medians over each task's iterations after its first (steady state), the
first iterations' compile/capture time, env steps/s end to end (collection + targets + update;
evaluation apart), update samples/s and its MFU: model FLOPs / update time / the bf16 matmul
throughput measured in this script (8192^3 products). Model FLOPs of one update sample (prompt +
action tokens, current or anchor): 2 x the forward's matmul FLOPs (the forward and, with frozen
base weights, the input gradients only) + 3 x attention's (forward + backward), over the Llama,
the projector and both vision towers; recomputation by gradient checkpointing is not counted.

Usage (GPU machine, after ``source bench/device_setup.sh install``):
    python bench/crl_job.py --out $OUT/crl_job.json [--methods crl seq_ft] [--variant shipped|speed_off]
CPU smoke test of the script itself (tiny random OpenVLA, 2 envs, software rendering):
    python bench/crl_job.py --size tiny --num_envs 2 --frames 16 --eval_episodes 2 --eval_steps 4 --out /tmp/j.json
    (``--methods vla_rl``: the same for configs/vla_rl.yaml)
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

VARIANTS = {  # dotted config keys -> values; "shipped": configs/crl.yaml as it is
    "shipped": {},
    "speed_off": {"model.policy.init_args.gradient_checkpointing": True,
                  "model.policy.init_args.lora.compute_dtype": "float32",
                  "model.micro_batch_size": None, "model.target_chunk_size": 64},
}
PHASES = ["collection", "collection/acting", "collection/env", "reward_shaping", "rollout_targets", "anchor_targets",
          "update/forward", "update/backward", "update/optimizer", "update", "evaluation", "checkpoint",
          "compile_capture", "iteration"]


def log(*a):
    print(f"[crl_job {time.strftime('%H:%M:%S')}]", *a, flush=True)


def matmul_tflops(device: str) -> float | None:
    import torch
    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    times = []
    for _ in range(13):
        torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * 8192**3 / statistics.median(times[3:]) / 1e12


def config(args, method: str) -> str:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(ROOT, "configs", "vla_rl.yaml" if method == "vla_rl" else "crl.yaml"))
    pol = cfg.model.policy.init_args
    pol.backbone.init_args.pretrained = args.ckpt
    pol.norm_stats = args.ckpt
    if args.device == "cpu":
        pol.backbone.init_args.dtype = "float32"
        pol.compile_decode = False
    if method == "vla_rl":  # one GPU, the bundle's suite, the random checkpoint's statistics and RPRM
        from random_openvla_checkpoint import UNNORM_KEY

        cfg.trainer.devices, cfg.trainer.strategy = 1, "auto"
        pol.unnorm_key = UNNORM_KEY
        cfg.data.stream[0].suite = "libero_goal"
        rprm = cfg.data.reward_shaping.rprm.init_args.backbone.init_args
        rprm.pretrained = args.ckpt
        if args.device == "cpu":
            rprm.dtype = "float32"
    overrides = dict(VARIANTS[args.variant])
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    if method == "vla_rl":  # the RPRM as configured (after the overrides)
        cfg.data.reward_shaping.checkpoint = rprm_checkpoint(OmegaConf.to_container(cfg.data.reward_shaping.rprm),
                                                             args.runs)
    cfg.trainer.logger.init_args.save_dir = args.runs
    cfg.trainer.logger.init_args.name = f"{method}_{args.variant}{args.tag}"
    cfg.trainer.enable_progress_bar = True
    if args.device == "cpu":
        cfg.trainer.accelerator = "cpu"
    cbs = []
    for cb in cfg.trainer.callbacks:
        name = cb.class_path.rsplit(".", 1)[-1]
        if name == "ModelCheckpoint" and not args.checkpoints:
            continue
        if name == "TaskSwitch":
            cb.init_args.iterations_per_task = args.iterations
            cb.init_args.save_checkpoints = args.checkpoints
        if name == "PerTaskEvaluation":
            cb.init_args.update(episodes_per_task=args.eval_episodes, num_envs=min(args.num_envs, args.eval_episodes),
                                max_steps=args.eval_steps, videos_per_task=0)
        cbs.append(cb)
    cfg.trainer.callbacks = cbs
    if method == "seq_ft" and "method" in cfg:  # the continual-learning method as one key: none
        cfg.method = None
    cfg.trainer.enable_checkpointing = args.checkpoints  # else Lightning adds a ModelCheckpoint of its own
    cfg.data.stream[0].task_ids = args.tasks
    if args.render is not None:
        cfg.data.stream[0].render_size = args.render
    cfg.data.num_envs = args.num_envs
    cfg.data.frames_per_batch = args.frames
    cfg.data.num_minibatches = max(1, args.frames // args.minibatch)
    path = os.path.join(args.runs, f"{method}_{args.variant}{args.tag}.yaml")
    OmegaConf.save(cfg, path)
    return path


def rprm_checkpoint(spec: dict, folder: str) -> str:
    """An RPRM checkpoint as scripts/train_rprm.py writes one (RPRMModule's: with LoRA, the adapters
    and head, the frozen VLM referenced), of an untrained RPRM (random head), built on the CPU; one
    file per RPRM config (``rprm_random_<hash of the config>.ckpt``), reused while it exists."""
    import hashlib

    import torch

    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(folder, f"rprm_random_{digest}.ckpt")
    if os.path.isfile(path):
        return path
    from datamodules.reward_shaping import build_rprm
    from modules.vla_rl.rprm_module import RPRMModule

    t = time.perf_counter()
    module = RPRMModule(build_rprm(spec))
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path + ".partial")
    os.replace(path + ".partial", path)
    log(f"wrote the RPRM checkpoint {path} in {time.perf_counter() - t:.0f} s")
    del module
    return path


class GpuMemoryPoll:
    """The largest GPU memory in use by all processes (nvidia-smi every 2 s): the training process
    and its EGL env workers together, which ``torch.cuda.max_memory_allocated`` does not see."""

    def __init__(self):
        self.peak_mib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.wait(2.0):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout.split()
                self.peak_mib = max([self.peak_mib] + [int(x) for x in out])
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


def run(args, method: str, save=None) -> dict:
    path = config(args, method)
    log(f"{method} ({args.variant}): python train.py --config {path}")
    poll = GpuMemoryPoll().__enter__()
    start = time.perf_counter()
    with open(os.path.join(args.logs or args.runs, f"{method}_{args.variant}{args.tag}.log"), "w") as out:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--config", path], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            out.write(line)
            if save is not None and line.startswith("task "):  # an iteration ended: keep what is measured
                save(_result(args, method, None, time.perf_counter() - start, poll))
            if (line.startswith(("task ", "error", "Traceback", "[")) or "Error" in line) \
                    and not line.startswith(("[robosuite", "[info]")):
                print("   ", line.rstrip()[:300], flush=True)
        rc = proc.wait()
    poll.__exit__()
    return _result(args, method, rc, time.perf_counter() - start, poll)


def _result(args, method: str, rc, wall: float, poll: GpuMemoryPoll) -> dict:
    files = sorted(glob.glob(os.path.join(args.runs, f"{method}_{args.variant}{args.tag}", "version_*", "timings.json")))
    try:
        rows = json.load(open(files[-1])) if files else []
    except ValueError:  # being rewritten
        rows = []
    return {"method": method, "variant": args.variant + args.tag, "overrides": args.set, "returncode": rc,
            "wall_s": wall, "gpu_mem_used_peak_gib": poll.peak_mib / 1024, "rows": rows}


def steady(result: dict, iterations: int) -> dict:
    """Medians over each task's iterations after its first; first iterations' compile/capture."""
    it = [r for r in result["rows"] if isinstance(r["iteration"], int)]
    later = [r for r in it if r["iteration"] % iterations != 0]
    first = [r for r in it if r["iteration"] % iterations == 0]
    out = {}
    keys = sorted({k for r in it for k in r if k != "iteration"})
    for k in keys:
        vals = [r[k] for r in (later or it) if k in r]
        if vals:
            out[k] = statistics.median(vals)
    out["first_iterations/compile_capture"] = sum(r.get("time/compile_capture", 0.0) for r in first)
    out["later_iterations/compile_capture"] = sum(r.get("time/compile_capture", 0.0) for r in later)
    start = [r for r in result["rows"] if r["iteration"] == "start"]
    out["start/evaluation"] = start[0].get("time/evaluation", 0.0) if start else 0.0
    return out


def update_flops_per_sample(ckpt: str, instructions: list[str]) -> float:
    """Model FLOPs of one update sample (see the module docstring)."""
    from modules.policy.openvla.checkpoint import read_config
    from modules.policy.openvla.tokenizer import load_tokenizer

    cfg = read_config(ckpt, "ckpt")
    t = cfg.text_config
    tok = load_tokenizer(ckpt, "ckpt")
    text = max(len(tok(f"In: What action should the robot take to {s.lower()}?\nOut:",
                       add_special_tokens=False)["input_ids"]) for s in instructions)
    towers = cfg.tower_specs
    T = 1 + towers[0].patches + text + 1 + 6  # BOS, patches, prompt, 29871, 6 teacher-forced action tokens
    h, i, L = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    linear = 2 * T * L * (4 * h * h + 3 * h * i)
    attention = 4 * T * T * h * L
    vision_dim = sum(s.hidden_size for s in towers)
    patches = towers[0].patches
    linear += 2 * patches * (vision_dim * 4 * vision_dim + 4 * vision_dim * h + h * h)  # projector
    for s in towers:
        tokens = s.patches + s.prefix_tokens
        blocks = s.depth - 1  # OpenVLA reads the second-to-last block
        linear += 2 * tokens * blocks * (4 * s.hidden_size ** 2 + 2 * s.hidden_size * s.mlp_size)
        attention += 4 * tokens * tokens * s.hidden_size * blocks
    return 2 * linear + 3 * attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--ckpt", default=None, help="OpenVLA checkpoint directory (written if missing)")
    ap.add_argument("--size", choices=["7b", "tiny"], default="7b")
    ap.add_argument("--methods", nargs="+", default=["crl", "seq_ft"], choices=["crl", "seq_ft", "vla_rl"])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="shipped")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more config overrides, e.g. model.micro_batch_size=16")
    ap.add_argument("--tasks", type=int, nargs="+", default=[8, 1])
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--frames", type=int, default=512)
    ap.add_argument("--minibatch", type=int, default=64)
    ap.add_argument("--num_envs", type=int, default=16)
    ap.add_argument("--render", type=int, default=None, help="LIBERO render size (default: the config's)")
    ap.add_argument("--eval_episodes", type=int, default=16)
    ap.add_argument("--eval_steps", type=int, default=60)
    ap.add_argument("--checkpoints", action="store_true", help="keep the config's checkpoints")
    ap.add_argument("--tag", default="", help="suffix of the run names (several invocations, one run dir)")
    ap.add_argument("--runs", default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--logs", default=None, help="where each run's console log goes (default: --runs)")
    args = ap.parse_args()
    import torch
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.runs = args.runs or tempfile.mkdtemp(prefix="crl_job_")
    os.makedirs(args.runs, exist_ok=True)
    args.ckpt = args.ckpt or os.path.join(tempfile.gettempdir(), f"openvla-{args.size}-random")
    if not os.path.isfile(os.path.join(args.ckpt, "config.json")):
        from random_openvla_checkpoint import write
        t = time.perf_counter()
        write(args.ckpt, args.size, args.device)
        log(f"wrote {args.ckpt} in {time.perf_counter() - t:.0f} s")
    peak = matmul_tflops(args.device)
    if peak:
        log(f"bf16 matmul 8192^3: {peak:.0f} TFLOP/s")
    from datamodules.libero_setup import task_language
    flops = update_flops_per_sample(args.ckpt, [task_language("libero_goal", t) for t in args.tasks])
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    results = {"device": device_name, "date": time.strftime("%Y-%m-%d"), "matmul_tflops": peak,
               "update_flops_per_sample": flops, "args": {k: v for k, v in vars(args).items()}, "runs": []}
    def save(res: dict) -> None:  # after every iteration and run: nothing measured is lost
        res["steady"] = steady(res, args.iterations)
        s = res["steady"]
        upd, rows = s.get("time/update"), s.get("perf/update_samples")
        if upd and rows and peak:
            s["perf/update_mfu"] = rows * flops / upd / (peak * 1e12)
        done = [r for r in results["runs"] if r["returncode"] is not None]
        with open(args.out + ".tmp", "w") as f:
            json.dump({**results, "runs": done + [res]}, f, indent=1)
        os.replace(args.out + ".tmp", args.out)

    for method in args.methods:
        res = run(args, method, save)
        save(res)
        results["runs"].append(res)
    print_table(results)


def print_table(results: dict) -> None:
    runs = results["runs"]
    print(f"\n{results['device']}, {results['date']}; bf16 matmul {results['matmul_tflops'] or 0:.0f} TFLOP/s; "
          f"update FLOPs/sample {results['update_flops_per_sample'] / 1e12:.2f} TFLOP")
    print("| | " + " | ".join(f"{r['method']} ({r['variant']})" for r in runs) + " |")
    print("|---|" + "---|" * len(runs))
    keys = [f"time/{p}" for p in PHASES] + ["perf/env_steps_per_s", "perf/env_steps_per_s_wall",
                                            "perf/update_samples", "perf/update_samples_per_s", "perf/update_mfu",
                                            "perf/peak_gpu_mem_gib", "first_iterations/compile_capture",
                                            "later_iterations/compile_capture", "start/evaluation"]
    for k in keys:
        vals = [r["steady"].get(k) for r in runs]
        if all(v is None for v in vals):
            continue
        print(f"| {k} | " + " | ".join("" if v is None else f"{v:.3g}" for v in vals) + " |")
    print("| GPU memory in use, all processes (GiB) | "
          + " | ".join(f"{r['gpu_mem_used_peak_gib']:.1f}" for r in runs) + " |")
    print("| return code, wall s | " + " | ".join(f"{r['returncode']}, {r['wall_s']:.0f}" for r in runs) + " |")


if __name__ == "__main__":
    main()
