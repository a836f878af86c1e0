"""The old-task memory (per-stage quota, total bound, own instructions, checkpointed), CRL with
memory anchors, and ER: stored transitions replayed through the policy's own losses."""
import torch
from lightning import Callback, Trainer
from tensordict import TensorDict

from callbacks.anchor import AnchorCriticFreeze
from callbacks.replay import ExperienceReplay
from callbacks.task_switch import TaskSwitch
from datamodules.on_policy import OnPolicyDataModule
from modules.crl_module import CRLModule
from modules.losses import experience_replay, ppo_clipped_surrogate

STREAM = [{"env": "babyai", "level": "GoToObjectRoom", "target": t} for t in ("red ball", "green key", "blue box")]


def _fake_samples(n, instruction, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDict({"image": torch.randint(0, 255, (n, 3, 56, 56), generator=g, dtype=torch.uint8),
                       "tokens": torch.randint(3, (n, 1), generator=g), "log_prob": -torch.rand(n, generator=g),
                       "advantage": torch.randn(n, generator=g)}, batch_size=[n]), [instruction] * n


def test_memory_quota_bound_goals_and_state_round_trip():
    torch.manual_seed(0)
    dm = OnPolicyDataModule(STREAM, num_envs=4, frames_per_batch=32, anchor_source="memory",
                            memory_per_task=10, memory_size=12)
    for k, target in enumerate(("red ball", "green key")):
        dm._last_samples, dm._last_instructions = _fake_samples(40, f"go to the {target}", k)
        dm.remember_task(k, head=k)
        dm.remember_task(k, head=k)  # a second callback at the same boundary stores nothing more
    mem = dm.memory
    # bounded: 12 in all, an equal share of 6 per stored stage; each state keeps its own goal
    assert mem.numel() == 12 and mem.get("task").tolist() == [0] * 6 + [1] * 6
    assert torch.equal(mem.get("goal"), mem.get("task"))
    assert dm.anchor_goals == ["go to the red ball", "go to the green key"] and dm.anchor_heads == [0, 1]
    # the stored rows are rows of that stage's samples (image, action, log-prob, advantage together)
    s0, _ = _fake_samples(40, "", 0)
    for row in mem[:6]:
        i = (s0.get("image") == row.get("image")).flatten(1).all(-1).nonzero().item()
        assert row.get("log_prob") == s0.get("log_prob")[i] and row.get("advantage") == s0.get("advantage")[i]
    fresh = OnPolicyDataModule(STREAM, num_envs=4, frames_per_batch=32, anchor_source="memory")
    fresh.load_state_dict(dm.state_dict())
    assert (fresh.memory == mem).all() and fresh.anchor_heads == [0, 1]


def test_experience_replay_terms():
    torch.manual_seed(0)
    log_prob, behaviour, adv = torch.randn(8).clamp(max=0), torch.randn(8).clamp(max=0), torch.randn(8)
    loss, terms = experience_replay(log_prob, behaviour, adv, 0.2, pg_coef=0.5, bc_coef=2.0)
    surrogate = ppo_clipped_surrogate(log_prob, behaviour, adv, 0.2)[0]
    assert torch.allclose(loss, -0.5 * surrogate + 2.0 * (-log_prob.mean()))
    assert torch.allclose(terms["er_bc"], -log_prob.mean())


class _Batches(Callback):
    def __init__(self):
        self.replay, self.anchor = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.replay.append(batch.get("replay"))
        self.anchor.append(batch.get("anchor"))


def _fit(tmp_path, module, dm, callbacks):
    Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, use_distributed_sampler=False, default_root_dir=str(tmp_path),
            callbacks=[TaskSwitch(iterations_per_task=1, save_checkpoints=False), *callbacks]
            ).fit(module, datamodule=dm)


def test_er_replays_stored_transitions_through_the_policy_loss(tiny_policy, tmp_path):
    torch.manual_seed(0)
    module = CRLModule(tiny_policy(), critic_hidden_sizes=[16], replay_pg_coef=1.0, replay_bc_coef=0.5)
    dm = OnPolicyDataModule(STREAM[:2], num_envs=4, frames_per_batch=32, ppo_epochs=1, num_minibatches=2,
                            memory_per_task=6)
    seen = _Batches()
    _fit(tmp_path, module, dm, [ExperienceReplay(), seen])
    assert not module.has_anchor  # ER alone: no anchors, no old policy
    assert dm.memory.numel() == 6 and set(dm.memory.get("task").tolist()) == {0}
    # task 0's two minibatches: no memory yet; task 1's: 3 stored transitions each, with their own goal
    assert seen.replay[:2] == [None, None] and [r.numel() for r in seen.replay[2:]] == [3, 3]
    replayed = torch.cat(seen.replay[2:])
    assert sorted(replayed.get("log_prob").tolist()) == sorted(dm.memory.get("log_prob").tolist())
    tok = module.policy.backbone.tokenizer
    text = " ".join(tok.convert_ids_to_tokens(replayed.get("input_ids")[0].tolist()))
    assert "red" in text and "green" not in text
    assert {"train/er_pg", "train/er_bc"} <= set(module.trainer.logged_metrics)


def test_crl_with_memory_anchors_logs_the_theory_quantities(tiny_policy, tmp_path):
    """anchor_source memory with the full Eq. 8 and Q heads: anchor samples are the stored
    old-task states with their own goal and head; D_old and M_old are logged every iteration."""
    torch.manual_seed(0)
    module = CRLModule(tiny_policy(), critic_hidden_sizes=[16], critic_type="q_dueling", alpha=1.0, beta_q=1.0)
    dm = OnPolicyDataModule(STREAM, num_envs=4, frames_per_batch=32, ppo_epochs=1, num_minibatches=1,
                            anchor_source="memory", memory_per_task=5)
    seen = _Batches()
    _fit(tmp_path, module, dm, [AnchorCriticFreeze(), seen])
    last = seen.anchor[-1]
    assert last.numel() == 10 and torch.equal(last.get("head"), last.get("goal"))
    assert sorted(last.get("goal").tolist()) == [0] * 5 + [1] * 5
    stored = dm.memory.get("image").flatten(1)
    assert all((stored == img).all(-1).any() for img in last.get("image").flatten(1))
    logged = module.trainer.logged_metrics
    for key in ("theory/kl_pi_old_anchor", "theory/adv_abs_anchor", "theory/value_drift_anchor",
                "theory/adv_abs_current"):
        assert key in logged and torch.isfinite(torch.as_tensor(logged[key]))
    # a KL: >= 0 up to float rounding (0 where the policy has not moved from the old one yet)
    assert logged["theory/kl_pi_old_anchor"] >= -1e-6
