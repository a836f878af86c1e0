"""LoRA through PEFT: only adapters train, the old policy is a second adapter on the same
base weights, adapters load with PeftModel.from_pretrained, and a full run with CRL."""
import glob
import json
import os

import pytest
import torch
from peft import PeftModel

from conftest import WORDS, run_train, small_config
from modules.crl_module import CRLModule
from modules.policy import TinyLlava, TokenVLAPolicy

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _backbone(seed=0):
    return TinyLlava(words=WORDS, action_bins=3, hidden_size=32, vision_hidden_size=32,
                     layers=2, vision_layers=1, heads=2, seed=seed)


def _inputs(policy, n=4):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 56, 56), dtype=torch.uint8, generator=g)
    return images, policy.encode([WORDS[i % 3] for i in range(n)])


def _perturb_trainable(policy):
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


def test_only_adapters_train_and_act_matches_evaluate():
    torch.manual_seed(0)
    policy = TokenVLAPolicy(_backbone(), action_tokens=2, action_bins=3, lora=LORA)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".default." in n for n in trainable)
    _perturb_trainable(policy)  # LoRA B starts at 0: make the adapter matter
    images, prompts = _inputs(policy)
    out = policy.act(images, prompts)
    again = policy.evaluate(images, prompts, out.tokens)
    assert torch.allclose(out.log_prob, again.log_prob, atol=1e-5)
    again.log_prob.sum().backward()
    assert all(p.grad is not None for n, p in policy.named_parameters() if p.requires_grad)


def test_old_policy_is_a_second_adapter_on_the_same_base():
    torch.manual_seed(0)
    module = CRLModule(TokenVLAPolicy(_backbone(), lora=LORA), critic_hidden_sizes=[16])
    policy = module.policy
    _perturb_trainable(policy)
    n_before = sum(p.numel() for p in policy.parameters())
    n_adapter = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    images, prompts = _inputs(policy)
    tokens = policy.act(images, prompts, greedy=True).tokens
    at_boundary = policy.evaluate(images, prompts, tokens).token_log_probs.detach()
    module.freeze_anchor()
    # the old policy added exactly one adapter's parameters: no second copy of the base
    assert sum(p.numel() for p in policy.parameters()) == n_before + n_adapter
    assert not any(p.requires_grad for n, p in policy.named_parameters() if ".old." in n)
    assert all(p.requires_grad for n, p in policy.named_parameters() if ".default." in n)
    old = module.old_policy.evaluate(images, prompts, tokens).token_log_probs
    assert torch.allclose(old, at_boundary, atol=1e-6)
    _perturb_trainable(policy)  # train the current adapter: pi moves, pi_old does not
    now = policy.evaluate(images, prompts, tokens).token_log_probs.detach()
    old_after = module.old_policy.evaluate(images, prompts, tokens).token_log_probs
    assert torch.allclose(old_after, at_boundary, atol=1e-6)
    assert (now - at_boundary).abs().max() > 1e-3
    # switching adapters for pi_old left the trainable adapter trainable and active
    assert all(p.requires_grad for n, p in policy.named_parameters() if ".default." in n)
    assert torch.allclose(policy.evaluate(images, prompts, tokens).token_log_probs, now, atol=1e-6)


def test_adapter_saved_in_peft_format_loads_with_from_pretrained(tmp_path):
    torch.manual_seed(0)
    policy = TokenVLAPolicy(_backbone(seed=3), lora=LORA)
    _perturb_trainable(policy)
    policy.save_adapter(str(tmp_path / "task0"))
    assert os.path.isfile(tmp_path / "task0" / "adapter_config.json")
    fresh = _backbone(seed=3)  # the same base weights, rebuilt from the config
    fresh.model = PeftModel.from_pretrained(fresh.model, str(tmp_path / "task0"))
    images, prompts = _inputs(policy)
    pixel = policy.backbone.preprocess(images)
    ours, _ = policy.backbone(prompts.input_ids, prompts.attention_mask, pixel)
    theirs, _ = fresh(prompts.input_ids, prompts.attention_mask, pixel)
    assert torch.allclose(ours, theirs, atol=1e-5)
    plain, _ = _backbone(seed=3)(prompts.input_ids, prompts.attention_mask, pixel)
    assert (ours - plain).abs().max() > 1e-3  # the adapter is what makes the difference


@pytest.mark.slow
def test_crl_with_lora_saves_adapters_and_slim_checkpoints_that_resume_exactly(tmp_path):
    """2 tasks x 2 iterations with LoRA, uninterrupted; then stopped after iteration 2 (task 1, the old
    policy's adapter in place) and resumed from its last.ckpt: the same metrics.json and weights. The
    checkpoints hold the trainable state and a record of the frozen base instead of its weights."""
    cfg = small_config(tmp_path, "lora", iterations=2, tasks=2, eval_episodes=2,
                       extra={"model.policy.init_args.lora": LORA})
    res = run_train("--config", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    full_dir = glob.glob(str(tmp_path / "runs" / "lora" / "version_*"))[0]
    for k in (0, 1):
        assert os.path.isfile(os.path.join(full_dir, "adapters", f"task{k}", "adapter_model.safetensors"))
    ckpt = torch.load(os.path.join(full_dir, "checkpoints", "task1_end.ckpt"), weights_only=False)
    keys = ckpt["state_dict"].keys()
    assert any(".old." in k for k in keys) and not any(k.startswith("old_policy.") for k in keys)
    # slim: no frozen base weight (LoRA adapters, critics, buffers only), the base recorded instead
    base = ckpt["frozen_base"]
    assert base["source"] == "checkpoints/tiny_llava_babyai.pt" and base["files"][0][0] == "tiny_llava_babyai.pt"
    assert len(base["tensors"]) > 20 and not set(base["tensors"]) & set(keys)
    assert all(".lora_" in k for k in keys if k.startswith("policy.") and k.endswith(".weight")
               and "layers." in k and "_proj." in k)

    res = run_train("--config", cfg, "--trainer.max_epochs=3")  # stops inside task 1: exit 3
    assert res.returncode == 3, res.stderr[-3000:]
    stopped_dir = max(glob.glob(str(tmp_path / "runs" / "lora" / "version_*")), key=os.path.getmtime)
    last = os.path.join(stopped_dir, "checkpoints", "last.ckpt")
    assert torch.load(last, weights_only=False)["epoch"] == 2
    res = run_train("--config", cfg, "--ckpt_path", last)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed_dir = max(glob.glob(str(tmp_path / "runs" / "lora" / "version_*")), key=os.path.getmtime)
    assert json.load(open(os.path.join(resumed_dir, "metrics.json"))) == json.load(
        open(os.path.join(full_dir, "metrics.json")))
    a = torch.load(os.path.join(full_dir, "checkpoints", "last.ckpt"), weights_only=False)["state_dict"]
    b = torch.load(os.path.join(resumed_dir, "checkpoints", "last.ckpt"), weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # another base (the random-init tiny VLM instead of the pretrained one): one line, exit 2
    res = run_train("--config", cfg, "--ckpt_path", last,
                    "--model.policy.init_args.backbone.init_args.checkpoint=null")
    line = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and line.startswith("error: model.policy.init_args.backbone (source None): ")
    assert "weights differ from the configured base" in line and "Traceback" not in res.stderr


@pytest.mark.slow
def test_per_task_adapters_isolate_tasks_and_survive_resume(tmp_path):
    cfg = small_config(tmp_path, "pta", iterations=2, tasks=2, ablation=["lora", "per_task_adapters"])
    res = run_train("--config", cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    log_dir = glob.glob(str(tmp_path / "runs" / "pta" / "version_*"))[0]
    import json
    # task 0 is evaluated with its own adapter after task 1: the same success exactly, greedy
    # and sampled (evaluation samples from its own seeded stream)
    for file in ("metrics.json", "metrics_greedy.json"):
        m = json.load(open(os.path.join(log_dir, file)))
        assert m["complete"] and m["R"][1][0] == m["R"][0][0], file
    ckpt = torch.load(os.path.join(log_dir, "checkpoints", "task1_end.ckpt"), weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if "PerTaskAdapters" in k)
    assert state["routes"] == {"go to the red ball": "task0", "go to the green key": "task1"}
    sd = ckpt["state_dict"]
    a0 = {k: v for k, v in sd.items() if ".task0." in k}
    a1 = {k.replace(".task1.", ".task0."): v for k, v in sd.items() if ".task1." in k}
    assert a0 and a0.keys() == a1.keys()
    # task 1 was trained from a fresh adapter: its LoRA weights differ from task 0's
    assert any((a0[k] - a1[k]).abs().max() > 0 for k in a0)
    # the PEFT-format file of task 0 holds task 0's adapter (saved before the reset)
    from safetensors.torch import load_file
    saved = load_file(os.path.join(log_dir, "adapters", "task0", "adapter_model.safetensors"))
    assert len(saved) == len(a0)
    for name, value in saved.items():  # PEFT drops the adapter name from the saved keys
        match = [v for k, v in a0.items() if k.endswith(name.replace(".weight", ".task0.weight"))]
        assert len(match) == 1 and torch.equal(match[0], value), name
    res = run_train("--config", cfg, "--ckpt_path", os.path.join(log_dir, "checkpoints", "task0_end.ckpt"))
    assert res.returncode == 0, res.stderr[-3000:]


def test_rollout_policy_acts_with_the_adapter_its_instruction_is_routed_to():
    from tensordict import NonTensorData, TensorDict

    from modules.policy.lora import snapshot_adapter
    from modules.rollout_policy import RolloutPolicy

    torch.manual_seed(0)
    policy = TokenVLAPolicy(_backbone(), lora=LORA)
    _perturb_trainable(policy)
    images, _ = _inputs(policy)

    def act(instruction):
        td = TensorDict({"observation": {"image": images},
                         "language_instruction": NonTensorData(instruction, batch_size=[4])}, batch_size=[4])
        return RolloutPolicy(policy, greedy=True)(td).get("token_log_probs")

    before = act(WORDS[0])
    snapshot_adapter(policy.backbone.model, dst="task0")
    policy.adapter_routes[WORDS[0]] = "task0"
    _perturb_trainable(policy)  # the trainable adapter moves on
    assert torch.allclose(act(WORDS[0]), before, atol=1e-6)  # routed: task 0's adapter
    unrouted = policy.encode([WORDS[0]] * 4)
    now = policy.act(images, unrouted, greedy=True).token_log_probs
    assert (now - before).abs().max() > 1e-3  # the trainable adapter differs
    assert all(p.requires_grad for n, p in policy.named_parameters() if ".default." in n)
