"""One frozen anchor head per finished stage: on a 4-task stream every old goal's anchor target
comes from the head trained on that goal, and checkpoints carry every head (safe loading)."""
import pytest
import torch
from lightning import Callback, Trainer
from tensordict import TensorDict

from callbacks.anchor import AnchorCriticFreeze
from callbacks.task_boundary import TaskBoundaryHooks
from callbacks.task_switch import TaskSwitch
from datamodules.on_policy import OnPolicyDataModule
from modules.anchor_critics import AnchorCritics
from modules.checkpoint_io import atomic_save, safe_load
from modules.crl_module import CRLModule
from modules.policy.backbone import EncodedPrompts

FOUR = ["red ball", "green key", "blue box", "red key"]  # words the tiny policy's vocabulary has
STREAM4 = [{"env": "babyai", "level": "GoToObjectRoom", "target": t, "objects": FOUR} for t in FOUR]
PROMPT_KEYS = ("input_ids", "attention_mask", "image_mask", "goal_mask")


def _trainer(tmp_path, callbacks, iterations=1):
    return Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                   default_root_dir=str(tmp_path),
                   callbacks=[TaskSwitch(iterations_per_task=iterations, save_checkpoints=False), *callbacks])


class _CriticAtTaskEnd(Callback, TaskBoundaryHooks):
    """The trainable critic at each task end, before AnchorCriticFreeze (listed after it) freezes it."""

    def __init__(self):
        self.critics = {}

    def on_task_end(self, trainer, pl_module, task_index):
        self.critics[task_index] = {k: v.clone() for k, v in pl_module.critic.state_dict().items()}


class _LastAnchorBatch(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if "anchor" in batch:
            self.batch = batch["anchor"].clone()


def test_four_task_stream_each_old_goal_gets_the_head_trained_on_it(tiny_policy, tmp_path):
    torch.manual_seed(0)
    module = CRLModule(tiny_policy(), critic_hidden_sizes=[16], alpha=1.0, beta_v=1.0, critic_lr=1e-2)
    dm = OnPolicyDataModule(STREAM4, num_envs=4, frames_per_batch=32, ppo_epochs=1, num_minibatches=1,
                            anchor_fraction=1.0)
    ends, last = _CriticAtTaskEnd(), _LastAnchorBatch()
    _trainer(tmp_path, [ends, AnchorCriticFreeze(), last]).fit(module, datamodule=dm)
    # three boundaries, three heads; head i is the critic as it was at the end of task i
    assert len(module.anchor_critics) == 3
    for i in range(3):
        head = module.anchor_critics[i].state_dict()
        assert all(torch.equal(head[k], ends.critics[i][k]) for k in head)
        assert not any(p.requires_grad for p in module.anchor_critics[i].parameters())
    assert dm.anchor_goals == [f"go to the {t}" for t in FOUR[:3]] and dm.anchor_heads == [0, 1, 2]
    # the last stage's anchor samples: every old goal present, each with its own head
    anc = last.batch
    goal, head = anc.get("goal"), anc.get("head")
    assert set(goal.tolist()) == {0, 1, 2} and torch.equal(head, goal)
    prompts = EncodedPrompts(*(anc.get(k) for k in PROMPT_KEYS))
    old = module.old_policy.evaluate(anc.get("image"), prompts, anc.get("tokens"))
    per_head = torch.stack([module.anchor_critics[i](old.phi, old.emb) for i in range(3)], -1)  # [B, heads]
    target = anc.get("value_target")
    assert torch.allclose(target, per_head.gather(1, goal[:, None]).squeeze(1), atol=1e-5)
    # the heads disagree, so a target from another head (the single-copied-head design) would fail
    for i in range(3):
        for j in range(3):
            if i != j:
                rows = goal == i
                assert (per_head[rows, j] - target[rows]).abs().max() > 1e-3


def test_checkpoint_round_trip_restores_every_head_and_the_memory(tiny_policy, tmp_path):
    """Every head, the running return std and the datamodule's memory go through a checkpoint file
    written atomically and read back with weights_only=True (the kit's safe load)."""
    torch.manual_seed(0)
    module = CRLModule(tiny_policy(), critic_hidden_sizes=[16], advantage_scaling="return_std")
    for _ in range(3):
        with torch.no_grad():
            for p in module.critic.parameters():
                p.add_(0.1 * torch.randn_like(p))
        module.freeze_anchor()
    module.return_std.update(torch.randn(50))
    dm = OnPolicyDataModule(STREAM4, num_envs=4, frames_per_batch=32, anchor_source="memory", memory_per_task=4)
    for k in range(3):
        n = 8
        dm._last_samples = TensorDict({"image": torch.randint(0, 255, (n, 3, 8, 8), dtype=torch.uint8),
                                       "tokens": torch.randint(3, (n, 1)), "log_prob": -torch.rand(n),
                                       "advantage": torch.randn(n)}, batch_size=[n])
        dm._last_instructions = [f"go to the {FOUR[k]}"] * n
        dm.remember_task(k, head=k)
    checkpoint = {"state_dict": module.state_dict(), "OnPolicyDataModule": dm.state_dict()}
    module.on_save_checkpoint(checkpoint)
    path = str(tmp_path / "heads.ckpt")
    atomic_save(checkpoint, path)
    loaded = safe_load(path, "ckpt_path")
    assert AnchorCritics.count_in(loaded["state_dict"]) == 3
    fresh = CRLModule(tiny_policy(seed=1), critic_hidden_sizes=[16], advantage_scaling="return_std")
    fresh.on_load_checkpoint(loaded)
    fresh.load_state_dict(loaded["state_dict"])  # strict: every head created
    phi, emb = torch.randn(5, 32), torch.randn(5, 32)
    for i in range(3):
        assert torch.equal(module.anchor_critics[i](phi, emb), fresh.anchor_critics[i](phi, emb))
    assert (module.anchor_critics[0](phi, emb) - module.anchor_critics[2](phi, emb)).abs().max() > 1e-3
    assert torch.equal(fresh.return_std.std, module.return_std.std) and fresh.return_std.count == 50
    fresh_dm = OnPolicyDataModule(STREAM4, num_envs=4, frames_per_batch=32, anchor_source="memory")
    fresh_dm.load_state_dict(loaded["OnPolicyDataModule"])
    assert (fresh_dm.memory == dm.memory).all()
    assert fresh_dm.memory.get("task").tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert fresh_dm.anchor_heads == [0, 1, 2] and fresh_dm.anchor_goals == dm.anchor_goals


def test_a_single_anchor_checkpoint_loads_as_head_zero(tiny_policy):
    """A state dict with one ``anchor_critic`` (one copied head) and no running return std loads,
    the head as head 0."""
    torch.manual_seed(0)
    module = CRLModule(tiny_policy(), critic_hidden_sizes=[16])
    module.freeze_anchor()
    state = {k.replace("anchor_critics.0.", "anchor_critic."): v for k, v in module.state_dict().items()
             if not k.startswith("return_std.")}
    fresh = CRLModule(tiny_policy(seed=1), critic_hidden_sizes=[16])
    fresh.on_load_checkpoint({"state_dict": state, "crl": {"has_anchor": True}})
    fresh.load_state_dict(state)
    phi, emb = torch.randn(5, 32), torch.randn(5, 32)
    assert len(fresh.anchor_critics) == 1 and torch.equal(module.anchor_critics[0](phi, emb),
                                                          fresh.anchor_critics[0](phi, emb))


def test_per_row_heads_and_their_gradient_reach_the_features():
    torch.manual_seed(0)
    from modules.critics import GoalConditionedCritic

    heads = AnchorCritics()
    for _ in range(2):
        heads.add(GoalConditionedCritic(4, [8]))
    phi = torch.randn(6, 4, requires_grad=True)
    emb = torch.randn(6, 4)
    which = torch.tensor([1, 0, 1, 1, 0, 0])
    out = heads(phi, emb, None, which)
    assert torch.allclose(out, torch.where(which == 0, heads[0](phi, emb), heads[1](phi, emb)))
    out.sum().backward()  # L_GCV's gradient reaches phi through the frozen heads
    assert phi.grad.abs().sum() > 0 and all(p.grad is None for p in heads.parameters())
    assert heads.advantage(phi, emb, None, which, None) is None  # V heads: no action value


@pytest.mark.parametrize("critic_init", ["fresh", "anchor"])
def test_next_critic_starts_fresh_or_from_the_anchor(tiny_policy, critic_init):
    torch.manual_seed(0)
    module = CRLModule(tiny_policy(), critic_hidden_sizes=[16], critic_type="q_dueling", critic_init=critic_init)
    with torch.no_grad():
        for p in module.critic.parameters():
            p.add_(0.1 * torch.randn_like(p))  # a trained head: A != 0
    module.freeze_anchor()
    head, new = module.anchor_critics[0].state_dict(), module.critic.state_dict()
    same_trunk = all(torch.equal(head[k], new[k]) for k in new if not k.startswith("advantage."))
    assert same_trunk == (critic_init == "anchor")
    assert new["advantage.weight"].abs().sum() == 0 and head["advantage.weight"].abs().sum() > 0
