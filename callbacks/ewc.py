"""OnlineEWC: the elastic-weight-consolidation baseline as a callback (modules/ewc.py).

At the end of every task but the last: the diagonal Fisher of the policy's action
log-probs on ``fisher_samples`` states of the task's last rollout (averaged over DDP ranks),
folded into the running Fisher (F* <- decay * F* + F_k), and theta* <- the current policy
weights. From then on the module adds L_EWC = lambda / 2 * sum F* (theta - theta*)^2 to its
loss (logged as ``train/ewc``). Use it instead of AnchorCriticFreeze
(``configs/ablations/ewc.yaml``).
"""
from __future__ import annotations

import torch

from callbacks.task_boundary import ContinualMethod
from modules.ewc import diagonal_fisher, ewc_penalty


class OnlineEWC(ContinualMethod):
    def __init__(self, lam: float = 100.0, decay: float = 1.0, fisher_samples: int = 128):
        """
        Args:
            lam: lambda, the weight of the EWC penalty lambda / 2 * sum F* (theta - theta*)^2.
            decay: the running Fisher's decay per task, F* <- decay * F* + F_k (1: plain sum).
            fisher_samples: states of the task's last rollout the Fisher is estimated on.
        """
        if lam < 0:
            raise ValueError(f"OnlineEWC.lam={lam!r}: must be >= 0")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"OnlineEWC.decay={decay!r}: must be in [0, 1]")
        if fisher_samples <= 0:
            raise ValueError(f"OnlineEWC.fisher_samples={fisher_samples!r}: must be > 0")
        self.lam, self.decay, self.fisher_samples = lam, decay, fisher_samples
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    @staticmethod
    def _params(pl_module) -> dict[str, torch.nn.Parameter]:
        return {k: p for k, p in pl_module.policy.named_parameters() if p.requires_grad}

    def _register(self, pl_module) -> None:
        if not self.fisher:
            return
        device = pl_module.device
        self.fisher = {k: f.to(device) for k, f in self.fisher.items()}
        self.anchor = {k: a.to(device) for k, a in self.anchor.items()}
        pl_module.penalties["ewc"] = lambda: ewc_penalty(
            self._params(pl_module), self.fisher, self.anchor, self.lam)

    def on_train_start(self, trainer, pl_module) -> None:
        self._register(pl_module)  # after a resume, the loaded F* and theta*

    def on_task_end(self, trainer, pl_module, task_index: int) -> None:
        samples = trainer.datamodule.last_samples
        if task_index + 1 >= trainer.datamodule.num_tasks or samples is None:
            return
        n = min(self.fisher_samples, samples.numel())
        pick = samples[torch.randperm(samples.numel(), device=samples.device)[:n]]
        params = self._params(pl_module)
        with torch.enable_grad():
            fisher = diagonal_fisher(lambda i: pl_module.action_log_prob(pick[i:i + 1]).sum(), params, n)
        if trainer.world_size > 1:
            fisher = {k: trainer.strategy.reduce(f, reduce_op="mean") for k, f in fisher.items()}
        for k, f in fisher.items():
            self.fisher[k] = self.decay * self.fisher[k] + f if k in self.fisher else f
        self.anchor = {k: p.detach().float().clone() for k, p in params.items()}
        self._register(pl_module)

    def state_dict(self):
        return {"fisher": {k: v.cpu() for k, v in self.fisher.items()},
                "anchor": {k: v.cpu() for k, v in self.anchor.items()}}

    def load_state_dict(self, state):
        self.fisher, self.anchor = dict(state["fisher"]), dict(state["anchor"])
