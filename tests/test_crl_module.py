"""CRLModule with real parts: a real Collector rollout, relabelled anchor samples, and a
real Lightning Trainer across a task boundary."""
import pytest
import torch
from helpers.rollouts import babyai_rollout as _rollout
from lightning import Callback, Trainer

from callbacks.anchor import AnchorCriticFreeze
from callbacks.task_boundary import TaskBoundaryHooks
from callbacks.task_switch import TaskSwitch
from datamodules.on_policy import OnPolicyDataModule
from modules.crl_module import CRLModule
from modules.policy.backbone import EncodedPrompts

STREAM = [{"env": "babyai", "level": "GoToObjectRoom", "target": t}
          for t in ("red ball", "green key", "blue box")]


def test_relabelled_anchor_samples_and_targets(tiny_policy):
    torch.manual_seed(0)
    module = CRLModule(tiny_policy(), critic_hidden_sizes=[16], alpha=1.0, beta_v=1.0)
    module.freeze_anchor()
    # make the current policy differ from the frozen old one
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rollout = _rollout(module)
    samples, anchors, stats = module.process_rollout(rollout, ["go to the red ball"], anchor_fraction=0.5)
    assert samples.numel() == 32 and anchors.numel() == 16
    # every anchor state is a current-task image relabelled with the old goal
    tok = module.policy.backbone.tokenizer
    for row in anchors.get("input_ids")[:3]:
        text = " ".join(tok.convert_ids_to_tokens(row[50:].tolist()))
        assert "red ball" in text and "green key" not in text
    imgs = samples.get("image").flatten(1)
    for img in anchors.get("image").flatten(1)[:4]:
        assert (imgs == img).all(-1).any()
    # targets come from the frozen old policy and anchor critic on the relabelled prompts
    prompts = EncodedPrompts(*(anchors.get(k) for k in ("input_ids", "attention_mask", "image_mask", "goal_mask")))
    old = module.old_policy.evaluate(anchors.get("image"), prompts, anchors.get("tokens"))
    assert torch.allclose(old.token_log_probs, anchors.get("old_token_log_probs"), atol=1e-5)
    assert torch.allclose(module.anchor_critic(old.phi, old.emb), anchors.get("value_target"), atol=1e-5)
    cur = module.policy.evaluate(anchors.get("image"), prompts, anchors.get("tokens"))
    assert (cur.token_log_probs - old.token_log_probs).abs().max() > 1e-4
    assert "rollout/explained_variance" in stats


def test_no_anchor_no_anchor_samples(tiny_policy):
    module = CRLModule(tiny_policy(), critic_hidden_sizes=[16])
    samples, anchors, _ = module.process_rollout(_rollout(module), ["go to the red ball"])
    assert anchors is None


class _Watch(Callback, TaskBoundaryHooks):
    def __init__(self):
        self.snap = {}

    def on_task_start(self, trainer, pl_module, task_index):
        if task_index == 1:
            self.snap = {
                "anchor": [p.detach().clone() for p in pl_module.anchor_critic.parameters()],
                "old": [p.detach().clone() for p in pl_module.old_policy.parameters()],
                "critic": [p.detach().clone() for p in pl_module.critic.parameters()],
                "policy": [p.detach().clone() for p in pl_module.policy.parameters()],
            }

    def on_train_end(self, trainer, pl_module):
        now = {"anchor": list(pl_module.anchor_critic.parameters()),
               "old": list(pl_module.old_policy.parameters()),
               "critic": list(pl_module.critic.parameters()),
               "policy": list(pl_module.policy.parameters())}
        self.changed = {k: max((a - b).abs().max().item() for a, b in zip(self.snap[k], now[k]))
                        for k in now}


def test_anchor_frozen_while_trainable_parts_change(tiny_policy, tmp_path):
    torch.manual_seed(0)
    module = CRLModule(tiny_policy(), critic_hidden_sizes=[16], alpha=1.0, beta_v=1.0, policy_lr=1e-3)
    dm = OnPolicyDataModule(STREAM[:2], num_envs=4, frames_per_batch=32, ppo_epochs=1, num_minibatches=2)
    watch = _Watch()
    trainer = Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      use_distributed_sampler=False, default_root_dir=str(tmp_path),
                      callbacks=[TaskSwitch(iterations_per_task=2, save_checkpoints=False),
                                 AnchorCriticFreeze(), watch])
    trainer.fit(module, datamodule=dm)
    assert trainer.current_epoch == 4 and dm.anchor_goals == ["go to the red ball"]
    assert watch.changed["anchor"] == 0.0 and watch.changed["old"] == 0.0
    assert watch.changed["critic"] > 1e-4 and watch.changed["policy"] > 1e-4
    assert all(not p.requires_grad for p in module.anchor_critic.parameters())


def _memory_anchor_samples(module, device):
    """ER/memory anchors: CPU-resident memory of old-task states, module (and rollout) on ``device``."""
    from tensordict import TensorDict

    module.freeze_anchor()
    rollout = _rollout(module).to(device)  # collected on the CPU (the datamodule's env device)
    module.to(device)
    images = rollout.get(("observation", "image"))
    memory = TensorDict({"image": images.reshape(-1, *images.shape[-3:])[:6].cpu(),
                         "goal": torch.zeros(6, dtype=torch.long)}, batch_size=[6])
    return module.process_rollout(rollout, ["go to the red ball"], anchor_fraction=0.5, anchor_memory=memory)


def test_memory_anchor_samples_cpu(tiny_policy):
    samples, anchors, _ = _memory_anchor_samples(CRLModule(tiny_policy(), critic_hidden_sizes=[16]), "cpu")
    assert anchors.numel() == 6 and torch.isfinite(anchors.get("value_target")).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_memory_anchor_samples_cuda(tiny_policy):
    """The memory stays on the CPU; its states must reach the GPU policy (failed on an H200 before)."""
    samples, anchors, _ = _memory_anchor_samples(CRLModule(tiny_policy(), critic_hidden_sizes=[16]), "cuda")
    assert anchors.numel() == 6 and anchors.get("value_target").device.type == "cuda"
