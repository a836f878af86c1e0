"""The OFT-style continuous policy (modules/policy/oft_vla.py), its Laplace head, the chunk
executor (datamodules/chunking.py), the toy_vla env kind, and train.py with CRL on and off."""
import glob
import json
import math
import os

import pytest
import torch
from conftest import ROOT, run_train_cases, small_config

WORDS = ["move to the green target", "reach the green marker"]
K, D = 4, 2


def make_oft(seed=0, lora=None, **kw):
    from modules.policy import TinyLlava
    from modules.policy.oft_vla import OFTPolicy

    torch.manual_seed(seed)
    bb = TinyLlava(words=WORDS + ["pick up a"], action_bins=3, hidden_size=32, vision_hidden_size=32,
                   layers=2, vision_layers=1, heads=2, seed=seed)
    return OFTPolicy(bb, chunk_size=K, action_dim=D, head_hidden=32, init_scale=0.2, lora=lora, **kw)


def _images(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 56, 56), dtype=torch.uint8, generator=g)


# -- the Laplace distribution, by hand -----------------------------------------------------
def test_laplace_log_prob_entropy_kl_by_hand():
    from modules.policy.laplace import laplace_entropy, laplace_kl, laplace_log_prob

    x, mu, b = torch.tensor(0.5), torch.tensor(0.2), torch.tensor(0.3)
    # log p = -log(2 * 0.3) - |0.5 - 0.2| / 0.3 = 0.5108256 - 1
    assert laplace_log_prob(x, mu, b.log()).item() == pytest.approx(-0.4891744, abs=1e-6)
    # H = 1 + log(2 * 0.3)
    assert laplace_entropy(b.log()).item() == pytest.approx(0.4891744, abs=1e-6)
    # KL(L(0, 1) || L(1, 2)) = log 2 + 1/2 + (1/2) e^-1 - 1
    kl = laplace_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(2.0).log())
    assert kl.item() == pytest.approx(math.log(2) + 0.5 + 0.5 * math.exp(-1) - 1, abs=1e-6)
    assert laplace_kl(mu, b.log(), mu, b.log()).item() == pytest.approx(0.0, abs=1e-7)
    # and against torch.distributions on a grid
    m1, m2 = torch.randn(50), torch.randn(50)
    lb1, lb2 = torch.randn(50) * 0.5, torch.randn(50) * 0.5
    ref = torch.distributions.kl_divergence(torch.distributions.Laplace(m1, lb1.exp()),
                                            torch.distributions.Laplace(m2, lb2.exp()))
    assert torch.allclose(laplace_kl(m1, lb1, m2, lb2), ref, atol=1e-5)
    xs = torch.randn(50)
    ref = torch.distributions.Laplace(m1, lb1.exp()).log_prob(xs)
    assert torch.allclose(laplace_log_prob(xs, m1, lb1), ref, atol=1e-5)


def test_laplace_samples_have_the_right_location_and_scale():
    from modules.policy.laplace import laplace_sample

    torch.manual_seed(0)
    mu, b = torch.full((200_000,), 0.3), torch.full((200_000,), 0.25)
    x = laplace_sample(mu, b.log())
    assert torch.isfinite(x).all()
    assert x.median().item() == pytest.approx(0.3, abs=0.005)
    assert (x - 0.3).abs().mean().item() == pytest.approx(0.25, abs=0.005)  # E|x - mu| = b


# -- the policy --------------------------------------------------------------------------------
def test_act_log_probs_equal_training_forward_and_match_the_laplace_sum():
    from modules.policy.laplace import laplace_log_prob

    policy = make_oft()
    prompts = policy.encode([WORDS[0], "pick up a", WORDS[1]] * 2)  # mixed lengths: left padding
    images = _images(6)
    torch.manual_seed(3)
    acted = policy.act(images, prompts)
    trained = policy.evaluate(images, prompts, acted.tokens)
    assert acted.tokens.shape == (6, K, D) and acted.token_log_probs.shape == (6, K, D, 2)
    assert torch.allclose(acted.log_prob, trained.log_prob, atol=1e-5)
    assert torch.allclose(acted.token_log_probs, trained.token_log_probs, atol=1e-5)
    assert torch.allclose(acted.phi, trained.phi, atol=1e-5)
    assert torch.allclose(acted.emb, trained.emb, atol=1e-5)
    mu, log_b = trained.token_log_probs.unbind(-1)
    by_hand = laplace_log_prob(acted.tokens, mu, log_b).sum((1, 2))
    assert torch.allclose(trained.log_prob, by_hand, atol=1e-5)
    # state-independent scale: entropy = K * D * (1 + log(2 * 0.2)) at init
    assert torch.allclose(trained.entropy, torch.full((6,), K * D * (1 + math.log(0.4))), atol=1e-5)
    # one sample per row: not the mean, and different across rows with the same input
    assert (acted.tokens - mu).abs().max() > 1e-3


def test_greedy_is_the_mean_and_the_chunk_depends_on_image_and_goal():
    policy = make_oft()
    images = _images(1).repeat(3, 1, 1, 1)
    images[2] = _images(1, seed=7)[0]
    prompts = policy.encode([WORDS[0], WORDS[1], WORDS[0]])
    out = policy.act(images, prompts, greedy=True)
    assert torch.equal(out.tokens, out.token_log_probs[..., 0])
    assert (out.tokens[0] - out.tokens[1]).abs().max() > 1e-5  # the goal matters
    assert (out.tokens[0] - out.tokens[2]).abs().max() > 1e-5  # the image matters
    # bidirectional attention (OFT): the image positions read the instruction, so phi(s) does too
    assert (out.phi[0] - out.phi[1]).abs().max() > 1e-5


def test_placeholder_slots_are_the_placeholders_input_embeddings():
    policy = make_oft()
    images, prompts = _images(2), policy.encode(WORDS)
    embed = policy.backbone.model.get_input_embeddings()
    before = policy.act(images, prompts, greedy=True).tokens
    assert not embed._forward_hooks  # the hook lives only inside the forward
    with torch.no_grad():
        policy.head.slots.normal_()
    after = policy.act(images, prompts, greedy=True).tokens
    assert (before - after).abs().max() > 1e-4
    # zero slots (init) = OFT's empty action embeddings; learned_slots=False keeps them fixed
    assert not make_oft(learned_slots=False).head.slots.requires_grad


def test_every_trainable_parameter_gets_a_gradient_and_the_lm_head_is_frozen():
    from modules.critics import GoalConditionedCritic

    policy = make_oft()
    assert not policy.backbone.model.get_output_embeddings().weight.requires_grad
    prompts, images = policy.encode(WORDS), _images(2)
    out = policy.evaluate(images, prompts, torch.randn(2, K, D))
    critic = GoalConditionedCritic(policy.feature_dim, [8])
    (out.log_prob.sum() + out.entropy.sum() + critic(out.phi, out.emb).sum()).backward()
    missing = [n for n, p in policy.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_env_action_clips_and_denormalises(tmp_path):
    stats = {"toy": {"action": {"q01": [-2.0, 0.0], "q99": [2.0, 1.0], "mask": [True, False]}}}
    path = tmp_path / "dataset_statistics.json"
    path.write_text(json.dumps(stats))
    a = torch.tensor([[[0.5, 1.5], [-3.0, 0.25]]])  # [1, 2, 2]
    assert make_oft().env_action(a).tolist() == [[[0.5, 1.0], [-1.0, 0.25]]]
    policy = make_oft(norm_stats=str(path), unnorm_key="toy")
    # masked dim: 0.5 (a + 1)(q99 - q01) + q01; unmasked (gripper-like): clipped only
    assert torch.allclose(policy.env_action(a), torch.tensor([[[1.0, 1.0], [-2.0, 0.25]]]), atol=1e-6)
    with pytest.raises(ValueError, match="unnorm_key"):
        make_oft(norm_stats=str(path), unnorm_key="nope")


def test_temperature_scales_b_for_acting_and_training_alike():
    p1, p2 = make_oft(), make_oft(temperature=2.0)
    images, prompts = _images(2), p1.encode(WORDS)
    x = torch.zeros(2, K, D)
    o1, o2 = p1.evaluate(images, prompts, x), p2.evaluate(images, prompts, x)
    assert torch.allclose(o2.token_log_probs[..., 1], o1.token_log_probs[..., 1] + math.log(2.0), atol=1e-6)
    assert torch.allclose(o2.token_log_probs[..., 0], o1.token_log_probs[..., 0], atol=1e-6)


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}])
def test_old_policy_snapshot_stays_fixed_while_the_policy_trains(lora):
    from modules.policy.oft_vla import OFTPolicy

    policy = make_oft(lora=lora)
    images, prompts = _images(4), policy.encode(WORDS * 2)
    x = torch.randn(4, K, D) * 0.3
    at_boundary = policy.evaluate(images, prompts, x).token_log_probs.detach()
    old = policy.snapshot()
    assert isinstance(old, OFTPolicy) == (lora is None)  # full FT: a frozen copy; LoRA: adapter + head
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        (-policy.evaluate(images, prompts, x).log_prob.sum()).backward()
        opt.step()
    now = policy.evaluate(images, prompts, x).token_log_probs.detach()
    assert (now - at_boundary).abs().max() > 1e-3
    assert torch.allclose(old.evaluate(images, prompts, x).token_log_probs, at_boundary, atol=1e-5)
    torch.manual_seed(0)
    sampled = old.act(images, prompts)
    assert torch.allclose(sampled.token_log_probs, at_boundary, atol=1e-5)
    # the live policy is unchanged by running the old one (the adapter switch is undone)
    assert torch.allclose(policy.evaluate(images, prompts, x).token_log_probs, now, atol=1e-6)
    if lora:
        assert not any(p.requires_grad for p in policy.old_head.parameters())


def test_lora_old_policy_survives_a_checkpoint_round_trip():
    """Resume: on_load_checkpoint recreates the old adapter and old_head, then the weights load."""
    from modules.crl_module import CRLModule

    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    module = CRLModule(make_oft(lora=lora), critic_hidden_sizes=[8])
    module.freeze_anchor()
    with torch.no_grad():
        for p in module.policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # the live policy moves on after the boundary
    state = module.state_dict()
    assert any(k.startswith("policy.old_head.") for k in state)
    fresh = CRLModule(make_oft(seed=1, lora=lora), critic_hidden_sizes=[8])
    fresh.on_load_checkpoint({"state_dict": state, "crl": {"has_anchor": True}})
    fresh.load_state_dict(state)  # strict: every key created
    images, prompts, x = _images(2), module.policy.encode(WORDS), torch.zeros(2, K, D)
    for a, b in ((module.old_policy, fresh.old_policy), (module.policy, fresh.policy)):
        assert torch.allclose(a.evaluate(images, prompts, x).token_log_probs,
                              b.evaluate(images, prompts, x).token_log_probs, atol=1e-6)
    live, old = (m.evaluate(images, prompts, x).token_log_probs for m in (fresh.policy, fresh.old_policy))
    assert (live - old).abs().max() > 1e-4


def test_crl_loss_uses_the_closed_form_laplace_kl():
    from modules.losses import crl_loss
    from modules.policy.laplace import laplace_kl
    from modules.policy.oft_vla import OFTPolicy

    old, new = torch.randn(3, K, D, 2) * 0.3, torch.randn(3, K, D, 2) * 0.3
    z = torch.zeros(3)
    _, terms = crl_loss(log_prob=z, old_log_prob=z, advantage=z, value=z, value_target=z, entropy=z,
                        anchor_token_log_probs=new, anchor_old_token_log_probs=old, anchor_value=z,
                        anchor_value_target=z, kl_fn=OFTPolicy.kl_to_old_policy, clip_eps=0.2, alpha=1.0,
                        beta_v=1.0, eta=1.0)
    by_hand = laplace_kl(old[..., 0], old[..., 1], new[..., 0], new[..., 1]).sum((1, 2)).mean()
    assert terms["kl_old"].item() == pytest.approx(by_hand.item(), abs=1e-6)


def test_chunk_q_critic_reads_the_executed_chunk_and_averages_over_the_policy():
    from modules.chunk_critic import ChunkQCritic
    from modules.crl_module import CRLModule

    module = CRLModule(make_oft(), critic_type="q", critic_hidden_sizes=[16])
    q = module.critic
    assert isinstance(q, ChunkQCritic) and q.net[0].in_features == 32 + 32 + K * D
    phi, emb = torch.randn(3, 32), torch.randn(3, 32)
    chunk = torch.rand(3, K, D) * 2 - 1
    outside = chunk.clone()
    outside[:, 0, 0] = torch.tensor([3.0, -5.0, 1.5])  # the env executes it clipped to [-1, 1]
    clipped = outside.clamp(-1, 1)
    assert torch.allclose(q(phi, emb, outside), q(phi, emb, clipped))
    assert (q(phi, emb, chunk) - q(phi, emb, chunk.flip(1))).abs().max() > 1e-4  # the order of the steps counts
    # E_pi Q: the mean of Q over chunks drawn from Laplace(mu, b); b -> 0 gives Q(s, mu)
    mu = torch.rand(3, K, D) - 0.5
    params = torch.stack([mu, torch.full_like(mu, -20.0)], -1)
    assert torch.allclose(q.state_value(phi, emb, params), q(phi, emb, mu), atol=1e-5)
    params = torch.stack([mu, torch.full_like(mu, math.log(0.3))], -1)
    torch.manual_seed(5)
    got = q.state_value(phi, emb, params)
    torch.manual_seed(5)
    from modules.policy.laplace import laplace_sample

    draws = laplace_sample(mu[:, None].expand(3, 8, K, D), params[:, None, ..., 1].expand(3, 8, K, D))
    by_hand = torch.stack([q(phi, emb, draws[:, m]) for m in range(8)], 1).mean(1)
    assert torch.allclose(got, by_hand, atol=1e-6)
    with pytest.raises(ValueError, match=r"chunks \[B, 4, 2\]"):
        q(phi, emb, torch.zeros(3, 7))


# -- the chunk executor on torchrl's ToyVLAEnv ------------------------------------------------
def _toy(n=3, max_steps=10, reward="tracking", success_steps=1, tol=0.05):
    from datamodules.toy_vla import make_toy_vla_env

    return make_toy_vla_env(n, seed=0, max_steps=max_steps, chunked=True,
                            options={"reward": reward, "success_steps": success_steps, "success_tol": tol})


def test_chunk_steps_the_env_k_times_and_sums_the_rewards():
    env = _toy(reward="tracking")
    td = env.reset()
    target = td["observation", "state"][:, D:]
    chunk = torch.tensor([0.9, -0.9]).expand(3, K, D).clone()  # far from every target: no success
    td["action"] = chunk
    out = env.step(td)
    nxt = out["next"]
    assert nxt["step_count"].squeeze(-1).tolist() == [K] * 3
    per_step = -(chunk[:, 0] - target).norm(dim=-1)  # ToyVLAEnv's reward: -||a - target||
    assert torch.allclose(nxt["reward"].squeeze(-1), K * per_step, atol=1e-5)
    assert not nxt["done"].any()
    assert torch.allclose(nxt["observation", "state"][:, :D], chunk[:, -1])  # the last executed action
    assert nxt["observation", "image"].shape == (3, 3, 56, 56)  # the rendering, channels first
    # one [D] action: one env step
    td = env.step_mdp(out)
    td["action"] = chunk[:, 0]
    assert env.step(td)["next", "step_count"].squeeze(-1).tolist() == [K + 1] * 3
    env.close()


def test_chunk_stops_at_done_and_keeps_the_finishing_step():
    env = _toy(reward="success", max_steps=6)
    td = env.reset()
    target = td["observation", "state"][:, D:]
    chunk = torch.full((3, K, D), 0.95)
    chunk[0, 1] = target[0]  # env 0 succeeds at inner step 2, then 0.95 again
    chunk[1, 3] = target[1]  # env 1 at inner step 4
    td["action"] = chunk
    nxt = env.step(td)["next"]
    assert nxt["reward"].squeeze(-1).tolist() == [1.0, 1.0, 0.0]  # counted once, not per skipped step
    assert nxt["success"].squeeze(-1).tolist() == [True, True, False]
    assert nxt["done"].squeeze(-1).tolist() == [True, True, False]
    assert nxt["step_count"].squeeze(-1).tolist() == [2, 4, 4]  # env 0 executed 2 of its 4 actions
    assert torch.allclose(nxt["observation", "state"][0, :D], target[0])  # its observation at the success
    # truncation inside a chunk: max_steps 6 -> the second chunk stops after 2 steps
    td = env.reset()
    td["action"] = torch.full((3, K, D), 0.95)
    td = env.step_mdp(env.step(td))
    td["action"] = torch.full((3, K, D), 0.95)
    nxt = env.step(td)["next"]
    assert nxt["step_count"].squeeze(-1).tolist() == [6] * 3
    assert nxt["truncated"].all() and not nxt["success"].any() and (nxt["reward"] == 0).all()
    env.close()


def test_chunk_rewards_are_not_double_counted_on_batched_envs():
    """SerialEnv keeps a finished env's stale reward in skipped steps (torchrl's MultiAction
    would sum it K times); the executor counts each env's executed steps only."""
    import functools

    from torchrl.envs import Compose, SerialEnv, StepCounter, TransformedEnv
    from torchrl.envs.custom import ToyVLAEnv
    from torchrl.envs.transforms import SuccessReward

    from datamodules.chunking import ChunkedActionEnv

    def one(i):
        toy = ToyVLAEnv(action_dim=D, state_dim=2 * D, success_steps=1, success_tol=0.05, seed=i)
        return TransformedEnv(toy, Compose(StepCounter(50), SuccessReward()))

    env = ChunkedActionEnv(SerialEnv(2, [functools.partial(one, i) for i in range(2)]))
    td = env.reset()
    chunk = torch.full((2, K, D), 0.95)
    chunk[0, 0] = td["observation", "state"][0, D:]
    td["action"] = chunk
    nxt = env.step(td)["next"]
    assert nxt["reward"].squeeze(-1).tolist() == [1.0, 0.0]
    assert nxt["step_count"].squeeze(-1).tolist() == [1, K]
    env.close()


def test_collector_rollout_with_the_oft_policy_reproduces_its_log_probs():
    from torchrl.collectors import Collector

    from datamodules.tasks import instructions_of
    from modules.rollout_policy import RolloutPolicy

    policy = make_oft()
    env = _toy(n=4, reward="success", max_steps=8, tol=0.25)
    collector = Collector(env, RolloutPolicy(policy), frames_per_batch=4 * 3, total_frames=-1,
                          auto_register_policy_transforms=False)
    try:
        rollout = next(iter(collector))
    finally:
        collector.shutdown()
    assert rollout.batch_size == (4, 3)
    assert rollout["action"].shape == (4, 3, K, D) and rollout["action_tokens"].shape == (4, 3, K, D)
    assert rollout["action"].abs().max() <= 1.0  # clipped for the env; action_tokens are not
    flat = rollout.reshape(-1)
    prompts = policy.encode(instructions_of(flat))
    out = policy.evaluate(flat["observation", "image"], prompts, flat["action_tokens"])
    assert torch.allclose(out.log_prob, flat["sample_log_prob"], atol=1e-5)
    # an episode lasts max_steps / K = 2 macro steps unless it succeeds earlier
    assert rollout["next", "step_count"].max() <= 8


def test_toy_vla_stream_parsing_and_bad_input():
    from datamodules.tasks import parse_stream

    tasks = parse_stream([{"env": "toy_vla", "instruction": "reach it", "max_steps": 16},
                          {"env": "toy_vla", "chunked": False}])
    assert tasks[0].instruction == "reach it" and tasks[0].max_steps == 16 and tasks[0].chunked
    assert tasks[1].instruction == "move to the green target" and not tasks[1].chunked
    assert tasks[0].name == "ToyVLA:reach it"
    for entry, key in [({"env": "toy_vla", "colour": 1}, "data.stream[0].colour=1"),
                       ({"env": "toy_vla", "success_tol": 0.9}, "data.stream[0].success_tol=0.9"),
                       ({"env": "toy_vla", "max_steps": 0}, "data.stream[0].max_steps=0"),
                       ({"env": "babyai", "level": "GoToObjectRoom", "target": "red ball", "chunked": True},
                        "data.stream[0].chunked=True")]:
        with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
            parse_stream([entry])


# -- train.py end to end -------------------------------------------------------------------------
RUNS = {"crl": (True, None), "seq_ft": (False, None), "crl_q": (True, "crl_q")}  # name: (anchor, ablation)


def oft_args(tmp_path, name):
    """The documented composition: quickstart (shrunk) + configs/policies/oft_tiny.yaml, then
    two of its tasks and 8 envs x 8 chunks (32 env steps) per iteration."""
    anchor, ablation = RUNS[name]
    overlay = tmp_path / "two_tasks.yaml"
    overlay.write_text("data:\n  frames_per_batch: 64\n  stream:\n"
                       "    - {env: toy_vla, instruction: move to the green target, max_steps: 32}\n"
                       "    - {env: toy_vla, instruction: reach the green marker, max_steps: 32}\n")
    return ["--config", small_config(tmp_path, f"oft_{name}", iterations=1, anchor=anchor, tasks=2, ablation=ablation),
            "--config", os.path.join(ROOT, "configs", "policies", "oft_tiny.yaml"), "--config", str(overlay)]


@pytest.fixture(scope="module")
def oft_runs(tmp_path_factory):
    """Every run, each its own train.py process (forked after the imports): {name: (dir, result)}."""
    runs = run_train_cases(tmp_path_factory, list(RUNS), lambda name, d: oft_args(d, name), timeout=600)
    return dict(zip(RUNS, runs))


@pytest.mark.parametrize("name", list(RUNS))
def test_train_py_one_iteration_per_task(oft_runs, name):
    anchor, ablation = RUNS[name]
    tmp_path, res = oft_runs[name]
    assert res.returncode == 0, res.stderr[-3000:]
    paths = glob.glob(str(tmp_path / "runs" / f"oft_{name}" / "version_*" / "metrics.json"))
    with open(paths[0]) as f:
        m = json.load(f)
    assert m["complete"] and len(m["R"]) == 2 and all(len(r) == 2 for r in m["R"])
    assert m["tasks"] == ["ToyVLA:move to the green target", "ToyVLA:reach the green marker"]
    assert all(0.0 <= v <= 1.0 for row in m["R"] + [m["b"]] for v in row)
    ckpt_path = os.path.join(os.path.dirname(paths[0]), "checkpoints", "task1_end.ckpt")
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["crl"]["has_anchor"] == anchor
    state = ckpt["state_dict"]
    assert state["policy.head.log_scale"].shape == (K, D)
    assert ("old_policy.head.log_scale" in state) == anchor  # full fine-tuning: a frozen copy
    # V(s, g) reads [phi; emb]; CRL-VLA (Q)'s chunk critic also the K x D chunk (anchor Q head too)
    width = 2 * 32 + (K * D if ablation == "crl_q" else 0)
    assert state["critic.net.0.weight"].shape[1] == width
    assert ("anchor_critic.net.0.weight" in state) == anchor


@pytest.mark.libero
def test_chunk_on_real_libero_executes_k_steps_and_stops_at_truncation():
    """One LIBERO env: a 4-action chunk with max_steps 3 ends after 3 executed steps, in the
    same state as stepping those 3 actions one by one (MuJoCo is deterministic)."""
    pytest.importorskip("libero")
    from datamodules.chunking import ChunkedActionEnv
    from datamodules.libero import LIBERO_OPTIONS, worker_env

    options = {**LIBERO_OPTIONS, "render_size": 64, "image_size": 32, "jpeg_quality": None,
               "center_crop": False}
    move = torch.tensor([[0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 1.0],
                         [0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 1.0], [-0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    one = {"seed": 0, "init_state_id": 0, "render_gpu": None, "options": options}
    env = ChunkedActionEnv(worker_env("libero_goal", 8, max_steps=3, **one))
    ref = worker_env("libero_goal", 8, max_steps=50, **one)
    try:
        td = env.reset()
        td["action"] = move
        nxt = env.step(td)["next"]
        assert nxt["done"].item() and nxt["truncated"].item() and nxt["reward"].item() == 0.0
        r = ref.reset()
        for k in range(3):
            r["action"] = move[k]
            r = ref.step_mdp(ref.step(r))
        assert torch.allclose(nxt["observation", "state"], r["observation", "state"], atol=1e-6)
        # (images are not compared: two LIBERO envs render the same state ~3 levels apart on average)
        assert nxt["observation", "image"].shape == (3, 32, 32)
        r["action"] = move[3]  # the 4th action would have moved the arm: it was not executed
        moved = ref.step(r)["next", "observation", "state"]
        assert (moved - nxt["observation", "state"]).abs().max() > 1e-4
    finally:
        env.close()
        ref.close()
