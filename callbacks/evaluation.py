"""PerTaskEvaluation: fills the success matrix R[j, i] and writes the run's results.

Every task of the stream is evaluated with E episodes before training (b_i) and after each
task (row j of R); optionally every N iterations as well (success curves). Episodes are
split over DDP ranks and the counts summed. Rank 0 writes ``metrics.json`` and ``R.csv``
in the run's log dir after every evaluation (``"complete": false`` until the last task
ends, so a crash keeps what was computed and nothing partial looks final), logs TensorBoard
scalars and an R heatmap, and prints the paths. With ``videos_per_task: V`` the first V
episodes of every task before training and at each task end are saved as
``videos/<when>/task<i>_ep<e>.mp4`` in the run's log dir and shown as animations in
TensorBoard (``callbacks/videos.py``). Every finished episode's outcome is written to
``eval_episodes/<when>.rank<r>.json`` as it ends, so an evaluation cut short (a time limit, a
crash) goes on from there when the run resumes (``callbacks/eval_episodes.py``; a resumed
evaluation films only the episodes it plays). ``env_worker_restarts`` in metrics.json counts the env
workers restarted (datamodules/robust_env.py) in training and in evaluation.

``python train.py test --config X [--ckpt_path Y]`` scores a checkpoint without training: each
evaluation runs every task once and writes ``evaluation.json`` (per-task success and its mean)
and the videos of that evaluation under ``videos/evaluation/``.

Several evaluations can run side by side (e.g. the policy as trained, sampled, and its
greedy decoding): each extra one gets a ``tag`` and writes ``metrics_<tag>.json``,
``R_<tag>.csv``, ``videos_<tag>/`` and TensorBoard scalars under ``eval_<tag>/``; the untagged
one writes ``metrics.json`` (what tables and ``--resume`` read).

A sampled evaluation draws its actions from its own stream, seeded per task and episode batch
like the episodes' layouts: the same policy gets the same success every time (a frozen task's
BWT is exactly 0), and evaluating never moves the training RNG (so DDP ranks, whose episodes
differ, stay in step, and changing the evaluation does not change training).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import deque

import numpy as np
import torch
from lightning import Callback
from lightning.pytorch.utilities import rank_zero_info
from torchrl.envs.utils import step_mdp

from callbacks.eval_episodes import EpisodeOutcomes, weights_fingerprint
from callbacks.metrics import continual_metrics, heatmap_image
from callbacks.task_boundary import TaskBoundaryHooks
from callbacks.videos import EpisodeRecorder, add_tensorboard_video, to_hwc_uint8, write_mp4
from datamodules.init_states import InitStateQueues
from datamodules.robust_env import RobustEnvPool, worker_restarts
from datamodules.tasks import check_joint
from modules.checkpoint_io import atomic_write_text
from modules.timing import phase


class PerTaskEvaluation(Callback, TaskBoundaryHooks):
    def __init__(self, episodes_per_task: int = 32, num_envs: int = 32, greedy: bool = False,
                 every_n_iterations: int = 0, seed: int = 12345, max_steps: int = 1000,
                 temperature: float | None = None, videos_per_task: int = 0, video_fps: int = 10,
                 tag: str = "", evaluate_before: bool | str = True, task_ends: str = "all", one_pool: bool = False):
        """
        Args:
            episodes_per_task: episodes per task and evaluation (LIBERO: episode e starts from the
                task's fixed initial state e; 50 is LIBERO's protocol).
            num_envs: envs run at once per rank.
            greedy: argmax actions; else sampled at ``temperature``.
            every_n_iterations: also evaluate every N iterations (success curves; 0: task ends only).
            seed: seed of the evaluation episodes and of their sampled actions.
            max_steps: step limit of an evaluation episode (the env's own limit applies first).
            temperature: sampling temperature (null: the policy's training temperature).
            videos_per_task: episodes of every task saved as MP4 at each evaluation.
            video_fps: frames per second of the videos.
            tag: names a second evaluation's files and scalars (``metrics_<tag>.json``); empty
                for the main one.
            evaluate_before: score the starting model before the first task (``b``, needed for
                forward transfer FT); false for a model trained from scratch (``b`` null, FT
                undefined); or the ``metrics.json`` of the run that trained the starting model
                (e.g. the SFT run whose exported policy this run loads): ``b`` is that run's final
                score, which must cover the same tasks with the same episodes, greedy and temperature.
            task_ends: ``all``: after every task (R's rows); ``last``: after the stream's last task
                only (one score of the final model, e.g. multi-task SFT cut into blocks; the other
                rows stay null and the continual metrics are not computed).
            one_pool: run every task's episodes through one pool of ``num_envs`` envs (worker w
                on task w mod K), each worker taking its task's next episode when one ends: one
                pool built per evaluation instead of one per ``num_envs`` episodes of each task
                (LIBERO workers take seconds to build). Needs fixed initial states (LIBERO;
                BabyAI with ``num_init_states``), tasks that differ only in their target, no
                multi-task stages, and ``num_envs`` >= the number of tasks. An episode is fixed
                by its task and initial state (BabyAI by the state; LIBERO by the state and a
                scene seed per episode, which places the fixtures), so greedy episodes are the
                per-task pools'.
        """
        if episodes_per_task <= 0:
            raise ValueError(f"PerTaskEvaluation.episodes_per_task={episodes_per_task!r}: must be > 0")
        if num_envs <= 0:
            raise ValueError(f"PerTaskEvaluation.num_envs={num_envs!r}: must be > 0")
        if max_steps <= 0:
            raise ValueError(f"PerTaskEvaluation.max_steps={max_steps!r}: must be > 0 (env steps per episode)")
        if temperature is not None and (greedy or temperature <= 0):
            raise ValueError(f"PerTaskEvaluation.temperature={temperature!r}: must be > 0, with greedy: false")
        self.episodes, self.num_envs, self.greedy = episodes_per_task, num_envs, greedy
        if videos_per_task < 0 or video_fps <= 0:
            raise ValueError(f"PerTaskEvaluation.videos_per_task={videos_per_task!r}, video_fps={video_fps!r}: "
                             "must be >= 0 and > 0")
        if not re.fullmatch(r"[A-Za-z0-9_]*", tag):
            raise ValueError(f"PerTaskEvaluation.tag={tag!r}: letters, digits and _ only")
        self.temperature = temperature
        if task_ends not in ("all", "last"):
            raise ValueError(f"PerTaskEvaluation.task_ends={task_ends!r}: 'all' or 'last'")
        self.tag, self.evaluate_before, self.task_ends, self.one_pool = tag, evaluate_before, task_ends, one_pool
        suffix = f"_{tag}" if tag else ""
        self.metrics_file, self.r_file = f"metrics{suffix}.json", f"R{suffix}.csv"
        self.scalar_prefix, self.video_folder = f"eval{suffix}", f"videos{suffix}"
        self.episodes_folder = f"eval_episodes{suffix}"
        self.videos, self.video_fps = videos_per_task, video_fps
        self.every_n, self.seed, self.max_steps = every_n_iterations, seed, max_steps
        self.b: list[float] | None = None
        self.R: list[list[float] | None] | None = None
        self.worker_restarts = {"step": 0, "start": 0}  # evaluation env workers restarted (robust_env.py)
        self.curves: list[dict] = []  # {"iteration", "task_trained", "success": [...]}

    # -- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def success_rate(self, trainer, pl_module, task_index: int, video_dir: str | None = None,
                     outcomes: EpisodeOutcomes | None = None) -> float:
        """Success over the task's episodes; with ``video_dir`` rank 0 also saves its first
        ``videos_per_task`` episodes there. Batches of episodes all in ``outcomes`` (an
        evaluation cut short and resumed) are not played again; played ones are recorded there."""
        dm = trainer.datamodule
        rank, world = trainer.global_rank, trainer.world_size
        mine = list(range(rank, self.episodes, world))  # this rank's episode ids
        outcomes = outcomes if outcomes is not None else EpisodeOutcomes(None, {})
        policy = pl_module.acting_policy(greedy=self.greedy, temperature=self.temperature)
        was_training = pl_module.training
        pl_module.eval()
        successes = 0
        for start in range(0, len(mine), self.num_envs):
            ids = mine[start:start + self.num_envs]
            known = [outcomes.get(task_index, e) for e in ids]
            if all(v is not None for v in known):  # the batch's envs, seeds and episodes are fixed
                successes += sum(known)
                continue
            # episode e starts from fixed initial state e (LIBERO's 50-states protocol)
            seed = self.seed + 7919 * task_index + ids[0]
            states = {"init_state_ids": ids}
            if dm.tasks[task_index].env == "libero":  # the episode's scene, as in one pool
                queues = InitStateQueues(len(ids), 1)
                queues.set([[e] for e in ids], scene_seeds=[self._scene_seed(task_index)] * len(ids))
                states = {"init_state_queues": queues}
            with phase("pool_start"):
                env = dm.make_env(dm.tasks[task_index], len(ids), seed=seed, **states)
            record = video_dir is not None and self.videos > 0 and rank == 0 and start == 0
            recorder = EpisodeRecorder(self.videos) if record else None
            # sampled actions draw from their own stream, seeded like the episodes: the same
            # policy gets the same success every time, and evaluating leaves training's RNG alone
            cuda = [pl_module.device] if pl_module.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(seed)
                won = self._run(env, policy, pl_module.device, recorder)
            successes += int(won.sum())
            for e, w in zip(ids, won.tolist()):
                outcomes.add(task_index, e, w)
            outcomes.flush()
            restarts = worker_restarts(env)
            self.worker_restarts = {k: self.worker_restarts[k] + restarts[k] for k in restarts}
            with phase("pool_close"):
                env.close()
            if recorder is not None:
                self._save_videos(trainer, recorder, task_index, video_dir, ids)
        pl_module.train(was_training)
        counts = torch.tensor([successes, len(mine)], dtype=torch.float64, device=pl_module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        return float(counts[0] / counts[1])

    def _scene_seed(self, task_index: int) -> int:
        """LIBERO: episode e of task k is laid out from seed ``_scene_seed(k) + e`` (numpy, which
        places the fixtures; datamodules/init_states.py): the same scene in per-task pools and in
        one pool, on any number of ranks, whichever worker plays it and after whatever episode."""
        return self.seed + 7919 * task_index

    def _run(self, env, policy, device, recorder: EpisodeRecorder | None = None) -> torch.Tensor:
        """Each env's first episode: success [n] (bool)."""
        td = env.reset()
        n = env.batch_size.numel()
        finished = torch.zeros(n, dtype=torch.bool)
        success = torch.zeros(n, dtype=torch.bool)
        partial = _takes_partial_steps(env)  # workers whose episode ended rest
        for _ in range(self.max_steps):
            if recorder is not None:
                recorder.add(td, ~finished)
            td = policy(td.to(device)).to(env.device)
            if partial:
                td.set("_step", ~finished.reshape(td.batch_size))
            td = env.step(td)
            done = td.get(("next", "done")).reshape(-1)
            first = done & ~finished  # only each env's first episode counts
            success |= first & td.get(("next", "success")).reshape(-1)
            finished |= done
            if finished.all():
                break
            td = step_mdp(td)
        return success

    def evaluate_all(self, trainer, pl_module, label: str | None = None) -> list[float]:
        """One success rate per task; ``label`` (e.g. ``after_task0``) names the video folder.
        Finished episodes are recorded in ``eval_episodes<_tag>/`` as they end
        (callbacks/eval_episodes.py): the same evaluation, resumed after an interruption, plays
        only the episodes that have no outcome yet."""
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank asks
        video_dir = None
        if label is not None and self.videos > 0:
            video_dir = os.path.join(log_dir or ".", self.video_folder, label)
        name = label or f"iteration{trainer.current_epoch + 1}"
        # the acting policy's weights (the critics, anchors and old policy do not act)
        key = {"evaluation": name, "step": trainer.global_step,
               "weights": weights_fingerprint(getattr(pl_module, "policy", pl_module)),
               "episodes": self.episodes, "greedy": self.greedy, "temperature": self.temperature,
               "seed": self.seed, "max_steps": self.max_steps, "num_envs": self.num_envs,
               "one_pool": self.one_pool, "world_size": trainer.world_size}
        path = None if log_dir is None else os.path.join(
            log_dir, self.episodes_folder, f"{name}.rank{trainer.global_rank}.json")
        outcomes = EpisodeOutcomes(path, key)
        if outcomes.recorded:
            rank_zero_info(f"[{self.scalar_prefix}] {name}: {outcomes.recorded} episodes already played (resumed)")
        with phase("evaluation"):
            if self.one_pool:
                return self.success_rates_in_one_pool(trainer, pl_module, video_dir, outcomes)
            return [self.success_rate(trainer, pl_module, i, video_dir, outcomes)
                    for i in range(trainer.datamodule.num_tasks)]

    @torch.no_grad()
    def success_rates_in_one_pool(self, trainer, pl_module, video_dir: str | None = None,
                                  outcomes: EpisodeOutcomes | None = None) -> list[float]:
        """Every task's success from one pool (``one_pool``): worker w runs task w mod K; each
        worker starts on its task's next unplayed episode and, when that ends, takes the task's
        next one, until none is left (then it rests: partial steps). Episodes in ``outcomes``
        (an evaluation cut short and resumed) are not played again."""
        dm = trainer.datamodule
        tasks, K = list(dm.tasks), dm.num_tasks
        self._check_one_pool(tasks)
        rank, world = trainer.global_rank, trainer.world_size
        mine = list(range(rank, self.episodes, world))
        outcomes = outcomes if outcomes is not None else EpisodeOutcomes(None, {})
        todo = [deque(e for e in mine if outcomes.get(k, e) is None) for k in range(K)]
        if any(todo):
            self._play_in_one_pool(trainer, pl_module, todo, mine, video_dir, outcomes)
        successes = [float(sum(outcomes.get(k, e) for e in mine)) for k in range(K)]
        counts = torch.tensor(successes + [float(len(mine))], dtype=torch.float64, device=pl_module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        return [float(counts[k] / counts[K]) for k in range(K)]

    def _play_in_one_pool(self, trainer, pl_module, todo: list[deque], mine: list[int],
                          video_dir: str | None, outcomes: EpisodeOutcomes) -> None:
        dm, rank = trainer.datamodule, trainer.global_rank
        tasks, K = list(dm.tasks), dm.num_tasks
        W = min(self.num_envs, K * max(len(q) for q in todo))
        libero = tasks[0].env == "libero"
        scene = [self._scene_seed(w % K) for w in range(W)]
        # a worker may end up playing every episode of its task: queues as long as the longest
        ids = InitStateQueues(W, max(len(q) for q in todo))
        playing = [todo[w % K].popleft() if todo[w % K] else None for w in range(W)]
        # a worker with nothing to play resets to some state and rests
        ids.set([[e if e is not None else mine[0]] for e in playing], scene_seeds=scene if libero else None)
        seed = self.seed + self.episodes * rank
        with phase("pool_start"):
            env = dm.make_env(dataclasses.replace(tasks[0], target=None, subtasks=tuple(tasks)), W,
                              seed=scene if libero else seed, init_state_queues=ids)
        policy = pl_module.acting_policy(greedy=self.greedy, temperature=self.temperature)
        was_training = pl_module.training
        pl_module.eval()
        # the first videos_per_task episodes of each task, whichever worker plays them
        filmed = {(k, e) for k in range(K) for e in mine[:self.videos]} if video_dir is not None and rank == 0 else set()
        frames: dict[tuple[int, int], list] = {}
        partial = _takes_partial_steps(env)
        cuda = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            td = env.reset()
            running = torch.tensor([e is not None for e in playing])
            age = torch.zeros(W, dtype=torch.long)  # steps of each worker's current episode
            while running.any():
                for w in running.nonzero().flatten().tolist():
                    if (w % K, playing[w]) in filmed:
                        frame = to_hwc_uint8(td.get(("observation", "image"))[w])
                        frames.setdefault((w % K, playing[w]), []).append(frame)
                td = policy(td.to(pl_module.device)).to(env.device)
                if partial:
                    td.set("_step", running.reshape(td.batch_size))
                td = env.step(td)
                age += running.long()
                # an episode ends at the env's done or at max_steps (a failure unless it succeeded)
                ended = (td.get(("next", "done")).reshape(-1) | (age >= self.max_steps)) & running
                won = td.get(("next", "success")).reshape(-1) & td.get(("next", "done")).reshape(-1)
                again = torch.zeros(W, dtype=torch.bool)
                for w in ended.nonzero().flatten().tolist():
                    outcomes.add(w % K, playing[w], bool(won[w]))
                    age[w] = 0
                    playing[w] = todo[w % K].popleft() if todo[w % K] else None
                    if playing[w] is not None:  # the task's next episode, on this worker
                        ids.push(w, playing[w])
                    again[w] = running[w] = playing[w] is not None
                if ended.any():
                    outcomes.flush()
                td = step_mdp(td)
                if again.any():  # the next initial state of the worker's queue; the others keep theirs
                    td = env.reset(td.set("_reset", again.reshape(*td.batch_size, 1)))
        restarts = worker_restarts(env)
        self.worker_restarts = {k: self.worker_restarts[k] + restarts[k] for k in restarts}
        with phase("pool_close"):
            env.close()
        pl_module.train(was_training)
        for (k, e), clip in sorted(frames.items()):
            self._write_video(trainer, video_dir, k, e, np.stack(clip))
        if frames:
            rank_zero_info(f"[{self.scalar_prefix}] videos in {video_dir}")

    def _check_one_pool(self, tasks) -> None:
        where = "PerTaskEvaluation.one_pool=true"
        if any(t.subtasks for t in tasks):
            raise ValueError(f"{where}: the stream has multi-task stages; use per-task pools (one_pool: false)")
        check_joint(tasks, self.num_envs, who=where, num_envs_key="PerTaskEvaluation.num_envs")
        if tasks[0].env == "babyai" and tasks[0].params.get("num_init_states") is None:
            raise ValueError(f"{where}: BabyAI tasks need fixed initial states (num_init_states)")

    def _save_videos(self, trainer, recorder, task_index, video_dir, episode_ids):
        for e, frames in zip(episode_ids, recorder.episodes()):
            self._write_video(trainer, video_dir, task_index, e, frames)
        rank_zero_info(f"[{self.scalar_prefix}] videos of task {task_index} in {video_dir}")

    def _write_video(self, trainer, video_dir, task_index, episode, frames):
        write_mp4(os.path.join(video_dir, f"task{task_index}_ep{episode}.mp4"), frames, self.video_fps)
        exp = getattr(trainer.logger, "experiment", None)
        if exp is not None and hasattr(exp, "file_writer"):
            add_tensorboard_video(exp, f"{self.scalar_prefix}_video/task{task_index}_ep{episode}/"
                                       f"{os.path.basename(video_dir)}", frames, trainer.current_epoch, self.video_fps)

    # -- boundary events ------------------------------------------------------------------
    def on_task_start(self, trainer, pl_module, task_index):
        if self.R is None:  # the starting model, once
            self.R = [None] * trainer.datamodule.num_tasks
            if isinstance(self.evaluate_before, str):
                self.b = self._score_of_earlier_run(trainer, self.evaluate_before)
                self._record(trainer, f"before (from {self.evaluate_before})", self.b)
            elif self.evaluate_before:
                self.b = self.evaluate_all(trainer, pl_module, "before")
                self._record(trainer, "before", self.b)

    def _score_of_earlier_run(self, trainer, path: str) -> list[float]:
        """The final R row of an earlier run's metrics.json, checked to be this evaluation's."""
        where = f"PerTaskEvaluation.evaluate_before={path!r}"
        try:
            with open(path) as f:
                earlier = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}: cannot read it as a metrics.json ({e})") from None
        rows = [r for r in earlier.get("R") or [] if r is not None]
        tasks = [t.name for t in trainer.datamodule.tasks]
        expected = {"complete": True, "tasks": tasks, "episodes_per_task": self.episodes, "greedy": self.greedy,
                    "temperature": self.temperature}
        for key, value in expected.items():
            if earlier.get(key) != value:
                raise ValueError(f"{where}: its {key} is {earlier.get(key)!r}, this evaluation's {value!r}")
        if not rows or len(rows[-1]) != len(tasks):
            raise ValueError(f"{where}: no final score of {len(tasks)} tasks in its R")
        return [float(v) for v in rows[-1]]

    def on_task_results(self, trainer, pl_module, task_index, iterations):
        if self.task_ends == "last" and task_index < len(self.R) - 1:
            return
        row = self.evaluate_all(trainer, pl_module, f"after_task{task_index}")
        self.R[task_index] = row
        self.curves.append({"iteration": iterations, "task_trained": task_index,
                            "success": row, "task_end": True})
        self._record(trainer, f"after task {task_index}", row)

    def on_train_epoch_start(self, trainer, pl_module):
        self._task_trained = trainer.datamodule.task_index  # at the epoch's end TaskSwitch may have moved on

    def on_train_epoch_end(self, trainer, pl_module):
        if self.every_n and (trainer.current_epoch + 1) % self.every_n == 0:
            row = self.evaluate_all(trainer, pl_module)
            self.curves.append({"iteration": trainer.current_epoch + 1,
                                "task_trained": self._task_trained,
                                "success": row, "task_end": False})
            self._log_row(trainer, row)

    # -- a checkpoint's score, without training (train.py test) ------------------------------
    def on_test_epoch_end(self, trainer, pl_module):
        self.score(trainer, pl_module)

    def score(self, trainer, pl_module) -> list[float]:
        """Every task of the stream once: prints the per-task success, logs it, writes
        ``evaluation<_tag>.json`` and the first ``videos_per_task`` episodes of each task as
        ``videos<_tag>/evaluation/task<i>_ep<e>.mp4`` in the run's log dir."""
        success = self.evaluate_all(trainer, pl_module, "evaluation")
        self._log_row(trainer, success)
        log_dir = trainer.log_dir or "."  # a broadcast under DDP: every rank must ask
        if trainer.global_rank != 0:
            return success
        tasks = [t.name for t in trainer.datamodule.tasks]
        res = {"checkpoint": trainer.ckpt_path, "tasks": tasks, "episodes_per_task": self.episodes,
               "greedy": self.greedy, "temperature": self.temperature, "success": success,
               "mean_success": float(np.mean(success))}
        os.makedirs(log_dir, exist_ok=True)
        path = os.path.join(log_dir, self.metrics_file.replace("metrics", "evaluation", 1))
        atomic_write_text(path, json.dumps(res, indent=2))
        mode = "greedy" if self.greedy else f"sampled at temperature {self.temperature or 'of training'}"
        width = max(len(t) for t in tasks)
        source = trainer.ckpt_path or "weights of the config"
        lines = [f"Success over {self.episodes} episodes per task ({mode}; {source})"]
        lines += [f"  task {i}  {t:<{width}}  {v:.3f}" for i, (t, v) in enumerate(zip(tasks, success))]
        lines += [f"  mean    {'':<{width}}  {res['mean_success']:.3f}", f"wrote {path}"]
        print("\n".join(lines), flush=True)
        return success

    # -- results ----------------------------------------------------------------------------
    def results(self, tasks) -> dict:
        K = len(self.R)
        done = [r is not None for r in self.R]
        out = {"complete": done[-1] if self.task_ends == "last" else all(done), "tasks": [t.name for t in tasks],
               "episodes_per_task": self.episodes, "greedy": self.greedy, "temperature": self.temperature,
               "b": self.b, "R": self.R, "curves": self.curves}
        if all(done):
            in_task = [[c["success"][k] for c in self.curves if c["task_trained"] == k]
                       for k in range(K)]
            out["metrics"] = continual_metrics(self.R, self.b, in_task)
        return out

    def _log_row(self, trainer, row):
        if trainer.logger is not None:
            scalars = {f"{self.scalar_prefix}/success_task{i}": v for i, v in enumerate(row)}
            scalars[f"{self.scalar_prefix}/worker_restarts"] = float(sum(self.worker_restarts.values()))
            trainer.logger.log_metrics(scalars, step=trainer.current_epoch)

    def _record(self, trainer, label, row):
        self._log_row(trainer, row)
        log_dir = trainer.log_dir or "."  # a broadcast under DDP: every rank must ask
        if trainer.global_rank != 0:
            return
        rank_zero_info(f"[{self.scalar_prefix}] {label}: " + " ".join(f"{v:.2f}" for v in row))
        os.makedirs(log_dir, exist_ok=True)
        res = self.results(trainer.datamodule.tasks)
        training = getattr(trainer.datamodule, "worker_restarts", None)
        res["env_worker_restarts"] = {"training": training() if training else None,
                                      "evaluation": self.worker_restarts}
        atomic_write_text(os.path.join(log_dir, self.metrics_file), json.dumps(res, indent=2))
        rows = ["row," + ",".join(res["tasks"])]
        if self.b is not None:
            rows.append("before," + ",".join(f"{v:.4f}" for v in self.b))
        rows += [f"after_task{j}," + ",".join(f"{v:.4f}" for v in r)
                 for j, r in enumerate(self.R) if r is not None]
        atomic_write_text(os.path.join(log_dir, self.r_file), "\n".join(rows) + "\n")
        if "metrics" in res:
            self._final_report(trainer, res, log_dir)

    def _final_report(self, trainer, res, log_dir):
        R = np.array(res["R"])
        mode = "greedy" if self.greedy else f"sampled at temperature {self.temperature or 'of training'}"
        lines = [f"Success matrix R[j, i] (row j: after training task j; column i: task i; {mode})",
                 "          " + " ".join(f"task{i:<3d}" for i in range(len(R)))]
        if res["b"] is not None:
            lines.append("before    " + " ".join(f"{v:7.2f}" for v in res["b"]))
        lines += [f"after {j:<3d} " + " ".join(f"{v:7.2f}" for v in r) for j, r in enumerate(R)]
        lines.append("  ".join(f"{k}={v:+.3f}" if v is not None else f"{k}=undefined"
                               for k, v in res["metrics"].items()))
        lines.append(f"wrote {os.path.join(log_dir, self.metrics_file)} and {os.path.join(log_dir, self.r_file)}")
        print("\n".join(lines), flush=True)
        exp = getattr(trainer.logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_image"):
            exp.add_image(f"{self.scalar_prefix}/R", heatmap_image(R), trainer.current_epoch)
            for k, v in res["metrics"].items():
                if v is not None:  # undefined for one task
                    exp.add_scalar(f"{self.scalar_prefix}/{k}", v, trainer.current_epoch)

    @property
    def state_key(self) -> str:  # two evaluations in one trainer keep separate checkpoint state
        return self._generate_state_key(tag=self.tag) if self.tag else super().state_key

    def state_dict(self):
        return {"b": self.b, "R": self.R, "curves": self.curves, "worker_restarts": dict(self.worker_restarts)}

    def load_state_dict(self, state):
        self.b, self.R, self.curves = state["b"], state["R"], state["curves"]
        self.worker_restarts = dict(state.get("worker_restarts", self.worker_restarts))


def _takes_partial_steps(env) -> bool:
    """Whether ``env`` (or the env a TransformedEnv wraps) steps only the workers of ``_step``."""
    return isinstance(getattr(env, "base_env", env), RobustEnvPool)
