"""CRLModule: the VLA policy, the trainable MC critic and (after the first task boundary)
the frozen anchor critic and frozen old policy, trained with PPO and the CRL-VLA loss.

The algorithm, top to bottom (one Lightning epoch = one PPO iteration):
  1. the datamodule collects a rollout with ``acting_policy()`` (TorchRL Collector);
  2. ``process_rollout``: values V(s, g) from the acting features, GAE advantages, MC
     returns, and the anchor samples (old goals) with their targets from the frozen models;
  3. ``training_step`` on each minibatch: Eq. 8 (modules/losses.py), clipped gradients,
     a policy step (skipped during critic warm-up) and a critic step; with
     ``micro_batch_size`` the minibatch's forward/backward runs in slices whose gradients add
     up to the whole minibatch's;
  4. the approximate KL between the rollout policy and the current one stops the PPO
     epochs early when it exceeds ``target_kl``.
Task boundaries are not known here: callbacks call ``freeze_anchor()``.
Each step is timed under a named phase (modules/timing.py; logged by callbacks/iteration_timing.py).
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from lightning import LightningModule
from tensordict import TensorDict

from datamodules.tasks import instructions_of
from modules.checkpoint_io import check_fits, rng_state, set_rng_state
from modules.chunk_critic import ChunkQCritic
from modules.critics import frozen_copy, make_critic
from modules.lora_checkpoint import drop_frozen_base, restore_frozen_base
from modules.losses import crl_loss
from modules.policy.backbone import EncodedPrompts, cat_prompts
from modules.policy.base import VLAPolicy, act_in_chunks
from modules.policy.lora import adapter_names
from modules.returns import gae, mc_returns
from modules.rollout_policy import RolloutPolicy
from modules.timing import phase

MIN_GAMMA_LAMBDA = 1e-6  # the smallest gamma and gamma * gae_lambda accepted (CRLModule.__init__)
PROMPT_KEYS = ("input_ids", "attention_mask", "image_mask", "goal_mask")


def _prompts_to_td(prompts: EncodedPrompts) -> dict:
    return dict(zip(PROMPT_KEYS, (prompts.input_ids, prompts.attention_mask,
                                  prompts.image_mask, prompts.goal_mask)))


def _prompts_from_td(td) -> EncodedPrompts:
    return EncodedPrompts(*(td.get(k) for k in PROMPT_KEYS))


def _require(name: str, value: float, low: float = 0.0, strict: bool = False) -> None:
    if value is None or not math.isfinite(value) or value < low or (strict and value == low):
        op = ">" if strict else ">="
        raise ValueError(f"model.{name}={value!r}: must be {op} {low}")


class CRLModule(LightningModule):
    def __init__(
        self,
        policy: VLAPolicy,
        critic_hidden_sizes: list[int] = (256, 256),
        policy_lr: float = 3e-4,
        critic_lr: float = 1e-3,
        adam_eps: float = 1e-5,
        clip_eps: float = 0.2,
        alpha: float = 1e-5,
        beta_v: float = 1e-3,
        eta: float = 1.0,
        entropy_coef: float = 0.0,
        gamma: float = 0.99,
        gae_lambda: float = 0.95,
        value_target: str = "mc",
        normalize_advantage: bool = True,
        target_kl: float | None = None,
        max_grad_norm: float = 1.0,
        critic_warmup_iterations: int = 0,
        critic_detach_features: bool = False,
        critic_type: str = "v",
        q_advantage: str = "q",
        target_chunk_size: int | None = None,
        micro_batch_size: int | None = None,
    ):
        """The policy, its critics and the PPO / CRL-VLA update (Eq. 8, docs/method.md).

        Args:
            policy: the VLA policy (``modules.policy.TokenVLAPolicy`` or ``OFTPolicy``).
            critic_hidden_sizes: hidden widths of the critic MLP on [phi(s); emb(g)].
            policy_lr: AdamW learning rate of the policy's trainable weights.
            critic_lr: AdamW learning rate of the critic head.
            adam_eps: AdamW epsilon of both optimisers.
            clip_eps: PPO's clipping range epsilon of the probability ratio.
            alpha: weight of L_KL, the KL to the frozen old policy on old goals.
            beta_v: weight of L_GCV, the frozen anchor critic's value consistency on old goals.
            eta: weight of L_MC, the trainable critic's value regression.
            entropy_coef: weight of the policy-entropy bonus (0: none).
            gamma: discount factor.
            gae_lambda: GAE's lambda for the advantages.
            value_target: the critic's regression target: ``mc`` (Monte-Carlo returns) or ``gae``.
            normalize_advantage: standardise the advantages of every minibatch.
            target_kl: stop an iteration's PPO epochs once the approximate KL exceeds it (null: never).
            max_grad_norm: gradient-norm clipping of each optimiser's parameters.
            critic_warmup_iterations: iterations after each critic (re)start with the policy frozen.
            critic_detach_features: the value losses train the critic head only, not phi(s) / emb(g).
            critic_type: ``v`` for V(s, g) heads, ``q`` for Q(s, a, g) heads (CRL-VLA (Q); a chunk
                policy's: Q(s, chunk, g), modules/chunk_critic.py).
            q_advantage: with Q heads, ``q`` (Q(s, a) - E_pi Q(s, .)) or ``gae`` (GAE, baseline E_pi Q).
            target_chunk_size: rows per ``act`` call when targets are computed without gradient
                (V(s') at truncations, the old policy on anchor samples). null: the acting batch
                when the policy keeps a static decode cache (those passes then reuse its cache
                and CUDA graphs and allocate nothing larger), else 1024.
            micro_batch_size: rows (current + anchor samples) per forward/backward inside a
                minibatch; the slices' gradients add up to the minibatch's. null: the whole
                minibatch at once. Smaller slices need less activation memory (so gradient
                checkpointing can stay off) at the same result.
        """
        super().__init__()
        for name in ("policy_lr", "critic_lr", "clip_eps", "max_grad_norm"):
            _require(name, locals()[name], strict=True)
        for name in ("alpha", "beta_v", "eta", "entropy_coef", "critic_warmup_iterations"):
            _require(name, locals()[name])
        _require("adam_eps", adam_eps, strict=True)
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= locals()[name] <= 1.0:
                raise ValueError(f"model.{name}={locals()[name]!r}: must be in [0, 1]")
        # torchrl's vectorised GAE fails (an IndexError) for gamma * lambda = 0 or below ~1e-7; the MC
        # return is GAE with lambda = 1
        if gamma < MIN_GAMMA_LAMBDA:
            raise ValueError(f"model.gamma={gamma!r}: must be >= {MIN_GAMMA_LAMBDA:g} (torchrl's GAE fails below)")
        if gamma * gae_lambda < MIN_GAMMA_LAMBDA:
            raise ValueError(f"model.gae_lambda={gae_lambda!r}: gamma * gae_lambda = {gamma * gae_lambda:.3g} "
                             f"must be >= {MIN_GAMMA_LAMBDA:g} (torchrl's GAE fails below)")
        if any(not isinstance(h, int) or h <= 0 for h in critic_hidden_sizes):
            raise ValueError(f"model.critic_hidden_sizes={list(critic_hidden_sizes)!r}: layer widths must be > 0")
        if value_target not in ("mc", "gae"):
            raise ValueError(f"model.value_target={value_target!r}: expected 'mc' or 'gae'")
        if q_advantage not in ("q", "gae"):
            raise ValueError(f"model.q_advantage={q_advantage!r}: expected 'q' or 'gae'")
        if target_kl is not None:
            _require("target_kl", target_kl, strict=True)
        for name in ("target_chunk_size", "micro_batch_size"):
            if locals()[name] is not None:
                _require(name, locals()[name], low=1)
        self.save_hyperparameters(ignore=["policy"])
        self.automatic_optimization = False
        self.policy = policy
        # V(s, g), or Q(s, a, g) for CRL-VLA (Q): advantage Q(s, a) - E_{a'~pi} Q(s, a')
        if critic_type == "q" and not getattr(policy, "token_actions", True):  # continuous chunks (OFT)
            self.critic = ChunkQCritic(policy.feature_dim, critic_hidden_sizes, policy.chunk_size, policy.action_dim,
                                       policy.action_low, policy.action_high, goal_dim=policy.goal_dim)
        else:
            self.critic = make_critic(critic_type, policy.feature_dim, critic_hidden_sizes,
                                      getattr(policy, "action_tokens", None), getattr(policy, "action_bins", None),
                                      goal_dim=policy.goal_dim)
        self.anchor_critic: torch.nn.Module | None = None
        self.old_policy = None  # TokenVLAPolicy (frozen copy) or AdapterPolicy (LoRA)
        self.critic_age = 0  # iterations started since the trainable critic was (re)initialised
        # extra loss terms registered by baseline callbacks (e.g. online EWC): name -> () -> scalar
        self.penalties: dict = {}
        self.rollout_stats: dict[str, float] = {}
        self.update_rows = 0  # samples (current + anchor) through the update since last read (timing)
        self._stop_epoch = False

    # -- acting -------------------------------------------------------------------------
    def acting_policy(self, greedy: bool = False, temperature: float | None = None) -> RolloutPolicy:
        """Training: the policy's temperature (model.policy.init_args.temperature); evaluation:
        greedy, or sampling at ``temperature`` (callbacks/evaluation.py)."""
        return RolloutPolicy(self.policy, greedy=greedy, temperature=temperature)

    # -- anchors (called by callbacks at task boundaries) ------------------------------
    @property
    def has_anchor(self) -> bool:
        return self.anchor_critic is not None

    def freeze_anchor(self) -> None:
        """Trainable critic -> frozen anchor critic; policy -> frozen old policy;
        a fresh trainable critic (and fresh optimiser state) for the next task."""
        self.anchor_critic = frozen_copy(self.critic)
        self.old_policy = self.policy.snapshot()
        self.critic.reset_parameters()
        if self._trainer is not None and self.trainer.optimizers:
            self.trainer.optimizers[1].state.clear()
        self.critic_age = 0

    # -- rollout -> training samples (no grad) ----------------------------------------
    @torch.no_grad()
    def process_rollout(self, rollout: TensorDict, anchor_goals: list[str],
                        anchor_fraction: float = 1.0, anchor_memory: TensorDict | None = None):
        """[envs, T] rollout -> (samples, anchor samples or None, stats)."""
        with phase("rollout_targets"):
            samples, stats = self._rollout_targets(rollout)
        anchors = None
        if self.has_anchor and (self.hparams.alpha > 0 or self.hparams.beta_v > 0):
            with phase("anchor_targets"):
                anchors = self._anchor_samples(samples, anchor_goals, anchor_fraction, anchor_memory)
        return samples, anchors, stats

    def _act_for_targets(self, act, images, prompts, greedy: bool):
        """``act`` without gradient over many rows, in chunks (``target_chunk_size``)."""
        hint = self.policy.act_batch_hint()
        chunk = self.hparams.target_chunk_size or hint or 1024
        return act_in_chunks(act, images, prompts, chunk, pad=hint is not None, greedy=greedy)

    def _rollout_targets(self, rollout: TensorDict):
        """Values, V(s') where needed, advantages and value targets of the rollout's samples."""
        hp = self.hparams
        n_env, T = rollout.batch_size
        flat = rollout.reshape(-1)
        phi, emb, tokens = flat.get("phi"), flat.get("emb"), flat.get("action_tokens")
        # V(s, g) (for a Q critic: E_{a~pi} Q(s, a, g)) and the critic's own prediction
        value = self.critic.state_value(phi, emb, flat.get("token_log_probs")).view(n_env, T)
        prediction = self.critic(phi, emb, tokens).view(n_env, T)
        done = rollout.get(("next", "done")).squeeze(-1)
        terminated = rollout.get(("next", "terminated")).squeeze(-1)
        # V(s'): the next step's value where the episode goes on; one act() on the real next
        # observation at truncations and at the end of the rollout.
        next_value = torch.zeros_like(value)
        next_value[:, :-1] = value[:, 1:]
        need = done.clone()
        need[:, -1] = True
        need &= ~terminated
        if need.any():
            nxt = rollout.get("next")[need]
            nout = self._act_for_targets(self.policy.act, self.policy.observation(nxt),
                                         self.policy.encode(instructions_of(nxt)),
                                         greedy=True)  # greedy: the distribution is what counts, and no RNG draw
            next_value[need] = self.critic.state_value(nout.phi, nout.emb, nout.token_log_probs)
        reward = rollout.get(("next", "reward")).squeeze(-1)
        advantage, gae_target = gae(reward, value, next_value, done, terminated, hp.gamma, hp.gae_lambda)
        if hp.value_target == "mc":
            target = mc_returns(reward, value, next_value, done, terminated, hp.gamma)
        else:
            target = gae_target
        if hp.critic_type == "q" and hp.q_advantage == "q":  # the paper's A(s, a) = Q(s, a, g) - E_{a'~pi} Q(s, a', g)
            advantage = prediction - value  # (q_advantage "gae": GAE on the rewards with V = E_{a'~pi} Q)

        prompts = self.policy.encode(instructions_of(flat))
        samples = TensorDict({
            "image": self.policy.observation(flat),
            "tokens": flat.get("action_tokens"),
            "log_prob": flat.get("sample_log_prob"),
            "advantage": advantage.reshape(-1),
            "value_target": target.reshape(-1),
            **_prompts_to_td(prompts),
        }, batch_size=[n_env * T])

        ended = done.sum().item()
        stats = {
            "rollout/episodes": float(ended),
            "rollout/explained_variance": float(
                1 - (target - prediction).var() / target.var().clamp_min(1e-8)),
            "rollout/value_mean": float(value.mean()),
            "rollout/reward_mean": float(reward.mean()),
        }
        if ended:
            stats["rollout/success"] = rollout.get(("next", "success")).sum().item() / ended
        return samples, stats

    def _anchor_samples(self, samples, anchor_goals, fraction, memory):
        """States with old goals and the frozen models' targets pi_old(.|s,g), V_old(s,g).
        Replay-free (default): current states relabelled with an earlier task's instruction.
        Memory: stored old-task states with their own instructions (the paper's setting)."""
        if memory is not None and memory.numel():
            # the memory lives on the CPU; a TensorDict built from parts can have device None
            images, goals = memory.get("image").to(self.device), memory.get("goal")
            texts = [anchor_goals[i] for i in goals.tolist()]
        elif anchor_goals:
            n = max(1, int(round(fraction * samples.numel())))
            idx = torch.randperm(samples.numel(), device=samples.device)[:n]
            images = samples.get("image")[idx]
            choice = torch.randint(len(anchor_goals), (n,)).tolist()
            texts = [anchor_goals[i] for i in choice]
        else:
            return None
        prompts = self.policy.encode(texts)
        old = self._act_for_targets(self.old_policy.act, images, prompts, greedy=False)
        return TensorDict({
            "tokens": old.tokens, "old_token_log_probs": old.token_log_probs,
            "value_target": self.anchor_critic(old.phi, old.emb, old.tokens),
            "image": images, **_prompts_to_td(prompts)}, batch_size=[len(old.tokens)])

    def action_log_prob(self, samples: TensorDict) -> torch.Tensor:
        """log pi(a | s, g) of the samples' actions under the current policy (with grad)."""
        return self.policy.evaluate(samples.get("image"), _prompts_from_td(samples),
                                    samples.get("tokens")).log_prob

    # -- one PPO minibatch -------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        hp = self.hparams
        cur, anc = batch["cur"], batch.get("anchor")
        n, na = cur.batch_size[0], 0 if anc is None else anc.batch_size[0]
        advantage = cur.get("advantage")
        if hp.normalize_advantage and advantage.numel() > 1:  # over the whole minibatch
            advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
        opt_policy, opt_critic = self.optimizers()
        opt_policy.zero_grad()
        opt_critic.zero_grad()
        terms: dict[str, torch.Tensor] = {}
        self.update_rows += n + na
        slices = self._slices(n, na)
        for k, (cs, ans) in enumerate(slices):
            sync = self.trainer.strategy.block_backward_sync() \
                if k + 1 < len(slices) and hasattr(self.trainer.strategy, "block_backward_sync") else nullcontext()
            with sync:
                with phase("update/forward"):
                    loss, part = self._slice_loss(cur[cs], advantage[cs], None if anc is None else anc[ans],
                                                  (cs.stop - cs.start) / n, (ans.stop - ans.start) / na if na else 0.0,
                                                  first=k == 0)
                with phase("update/backward"):
                    self.manual_backward(loss)
            for name, value in part.items():
                terms[name] = terms.get(name, 0.0) + value
        with phase("update/optimizer"):
            self.clip_gradients(opt_policy, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
            self.clip_gradients(opt_critic, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
            opt_critic.step()
            warming_up = self.critic_age <= hp.critic_warmup_iterations
            if not warming_up:  # critic warm-up (VLA-RL): the policy stays frozen
                opt_policy.step()

        approx_kl = self.all_gather(terms["approx_kl"]).mean()  # same decision on every rank
        if hp.target_kl is not None and approx_kl > hp.target_kl:
            self._stop_epoch = True
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, on_step=False, on_epoch=True,
                      sync_dist=True, batch_size=n)
        return terms["loss"]

    def _slices(self, n: int, na: int) -> list[tuple[slice, slice]]:
        """The current and anchor rows of each slice (``micro_batch_size``): both kinds spread
        evenly over the slices."""
        size = self.hparams.micro_batch_size
        k = 1 if size is None else min(n, max(1, math.ceil((n + na) / size)))

        def bounds(m):  # k contiguous, near-equal parts of range(m), as torch.tensor_split cuts
            edges = [m * i // k for i in range(k + 1)]
            return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]

        return list(zip(bounds(n), bounds(na)))

    def _slice_loss(self, cur, advantage, anc, current_weight: float, anchor_weight: float, first: bool):
        """Eq. 8 on one slice of a minibatch (one backbone forward over its current + anchor samples),
        weighted by the slice's share of each kind of sample; the baselines' penalties once."""
        hp = self.hparams
        prompts, images, tokens = _prompts_from_td(cur), cur.get("image"), cur.get("tokens")
        has_anchors = anc is not None and anc.batch_size[0] > 0
        if has_anchors:
            prompts = cat_prompts(prompts, _prompts_from_td(anc))
            images = torch.cat([images, anc.get("image")])
            tokens = torch.cat([tokens, anc.get("tokens")])
        out = self.policy.evaluate(images, prompts, tokens)
        n = cur.batch_size[0]
        phi, emb = out.phi[:n], out.emb[:n]
        if hp.critic_detach_features:
            phi, emb = phi.detach(), emb.detach()
        anchor_terms = {}
        if has_anchors:
            anchor_terms = dict(
                anchor_token_log_probs=out.token_log_probs[n:],
                kl_fn=getattr(self.policy, "kl_to_old_policy", None),  # OFTPolicy: Laplace KL
                anchor_old_token_log_probs=anc.get("old_token_log_probs"),
                anchor_value=self.anchor_critic(out.phi[n:], out.emb[n:], anc.get("tokens")),
                anchor_value_target=anc.get("value_target"))
        loss, terms = crl_loss(
            log_prob=out.log_prob[:n], old_log_prob=cur.get("log_prob"), advantage=advantage,
            value=self.critic(phi, emb, cur.get("tokens")), value_target=cur.get("value_target"),
            entropy=out.entropy[:n], clip_eps=hp.clip_eps, alpha=hp.alpha, beta_v=hp.beta_v,
            eta=hp.eta, entropy_coef=hp.entropy_coef, current_weight=current_weight,
            anchor_weight=anchor_weight, **anchor_terms)
        weights = {"kl_old": anchor_weight, "gcv": anchor_weight, "loss": 1.0}
        terms = {k: v * weights.get(k, current_weight) for k, v in terms.items()}
        if first:
            for name, penalty in self.penalties.items():  # baselines' terms (callbacks/ewc.py)
                value = penalty()
                loss = loss + value
                terms[name] = value.detach()
        return loss, terms

    def on_train_epoch_start(self) -> None:
        self._stop_epoch = False
        # counted when the iteration starts: a checkpoint written at an iteration's end (by a callback,
        # which Lightning runs before this module's epoch-end hook) holds the age the next one builds on
        self.critic_age += 1

    def on_train_batch_start(self, batch, batch_idx):
        if self._stop_epoch:
            return -1  # approx-KL early stop: skip the remaining PPO minibatches

    def on_train_epoch_end(self) -> None:
        if self.rollout_stats:
            self.log_dict(self.rollout_stats, sync_dist=True, prog_bar=False)
            if "rollout/success" in self.rollout_stats:
                self.log("success", self.rollout_stats["rollout/success"], prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx):
        """``train.py test``: the evaluation callbacks run the episodes (callbacks/evaluation.py)."""
        return None

    def configure_optimizers(self):
        hp = self.hparams
        # trainable parameters only: with LoRA the frozen base and the old adapter stay out
        # (the same set at the start and after a resume that recreates the old adapter)
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        return (torch.optim.AdamW(trainable, lr=hp.policy_lr, eps=hp.adam_eps, weight_decay=0.0),
                torch.optim.AdamW(self.critic.parameters(), lr=hp.critic_lr, eps=hp.adam_eps, weight_decay=0.0))

    # -- checkpoints: anchors, critic age and RNG ------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["crl"] = {
            "has_anchor": self.has_anchor, "critic_age": self.critic_age,
            "rng": rng_state(),
        }
        if self.policy.uses_lora:  # the trainable state only; the frozen base is referenced
            drop_frozen_base(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("crl", {})
        if self.policy.uses_lora:  # adapters made at task boundaries (old, per-task) must exist
            self.policy.ensure_adapters(adapter_names(checkpoint["state_dict"]))
        if state.get("has_anchor"):  # create the frozen modules so their weights load
            self.anchor_critic = frozen_copy(self.critic)
            self.old_policy = self.policy.snapshot()
        if "frozen_base" in checkpoint:
            restore_frozen_base(self, checkpoint)
        check_fits(self, checkpoint["state_dict"])
        self.critic_age = state.get("critic_age", 0)
        if state.get("rng"):
            set_rng_state(state["rng"])
