"""The token VLA: action-only sampling, and acting log-probs == training forward log-probs."""
import pytest
import torch

from conftest import WORDS


@pytest.mark.parametrize("n_tokens,bins,temp,pooling,image_position", [
    (1, 3, 1.0, "image_mean", "first"), (3, 7, 1.6, "image_mean", "first"), (3, 7, 1.0, "last", "first"),
    (3, 7, 1.0, "image_mean", "after_instruction"), (2, 5, 1.0, "image_flat", "first")])
def test_act_log_probs_equal_training_forward(tiny_policy, n_tokens, bins, temp, pooling, image_position):
    policy = tiny_policy(action_tokens=n_tokens, action_bins=bins, temperature=temp, feature_pooling=pooling,
                         image_position=image_position)
    torch.manual_seed(1)
    images = torch.randint(0, 256, (6, 3, 56, 56), dtype=torch.uint8)
    prompts = policy.encode([WORDS[0], "pick up a blue box", WORDS[2]] * 2)  # mixed lengths
    acted = policy.act(images, prompts)
    trained = policy.evaluate(images, prompts, acted.tokens)
    assert acted.tokens.shape == (6, n_tokens)
    assert ((acted.tokens >= 0) & (acted.tokens < bins)).all()
    assert torch.allclose(acted.log_prob, trained.log_prob, atol=1e-5)
    assert torch.allclose(acted.token_log_probs, trained.token_log_probs, atol=1e-5)
    assert torch.allclose(acted.phi, trained.phi, atol=1e-5)
    assert torch.allclose(acted.emb, trained.emb, atol=1e-5)


def test_later_tokens_depend_on_earlier_ones(tiny_policy):
    """The KV-cached decode really conditions on the sampled prefix."""
    policy = tiny_policy(action_tokens=2, action_bins=7)
    images = torch.randint(0, 256, (1, 3, 56, 56), dtype=torch.uint8).repeat(2, 1, 1, 1)
    prompts = policy.encode([WORDS[0]] * 2)
    out = policy.evaluate(images, prompts, torch.tensor([[0, 0], [5, 0]]))
    assert torch.allclose(out.token_log_probs[0, 0], out.token_log_probs[1, 0])
    assert (out.token_log_probs[0, 1] - out.token_log_probs[1, 1]).abs().max() > 1e-4


def test_temperature_scales_logits(tiny_policy):
    p1, p2 = tiny_policy(temperature=1.0), tiny_policy(temperature=2.0)
    images = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8)
    prompts = p1.encode(WORDS[:2])
    tok = torch.zeros(2, 1, dtype=torch.long)
    l1 = p1.evaluate(images, prompts, tok).token_log_probs
    l2 = p2.evaluate(images, prompts, tok).token_log_probs
    # log_softmax(z / 2) == log_softmax(log_softmax(z) / 2)
    assert torch.allclose(torch.log_softmax(l1 / 2, -1), l2, atol=1e-5)


def test_goal_features_see_instruction_state_features_do_not(tiny_policy):
    policy = tiny_policy()
    images = torch.randint(0, 256, (1, 3, 56, 56), dtype=torch.uint8).repeat(2, 1, 1, 1)
    prompts = policy.encode(WORDS[:2])
    out = policy.act(images, prompts)
    phi, emb = out.phi, out.emb
    assert torch.allclose(phi[0], phi[1], atol=1e-6)  # image first: causal, goal-independent
    assert (emb[0] - emb[1]).abs().max() > 1e-4


def test_image_after_the_instruction(tiny_policy):
    """image_position: after_instruction -> BOS, prompt up to the instruction's last token, the
    image placeholders, then the rest ("?", "Out:"); the image positions then read the instruction."""
    first, after = tiny_policy(), tiny_policy(image_position="after_instruction")
    a, b = first.encode(WORDS[:2]), after.encode(WORDS[:2])
    n_img = first.backbone.image_token_count
    for p in (a, b):
        assert int(p.image_mask[0].sum()) == n_img and int(p.goal_mask[0].sum()) == len(WORDS[0].split())
    # the same tokens, the image block moved to right after the instruction
    goal_end = int(b.goal_mask[0].nonzero().max())
    image_pos = b.image_mask[0].nonzero().flatten()
    assert image_pos.tolist() == list(range(goal_end + 1, goal_end + 1 + n_img))
    assert torch.equal(a.input_ids[0][~a.image_mask[0]], b.input_ids[0][~b.image_mask[0]])  # text order kept
    tail = first.backbone.tokenizer.convert_ids_to_tokens(b.input_ids[0, image_pos[-1] + 1:].tolist())
    assert tail == ["?", "out", ":"]
    # phi (image mean) now differs between instructions on the same frame
    images = torch.randint(0, 256, (1, 3, 56, 56), dtype=torch.uint8).repeat(2, 1, 1, 1)
    phi = after.act(images, b).phi
    assert (phi[0] - phi[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="image_position='middle'"):
        tiny_policy(image_position="middle")


def test_last_position_features_see_instruction_and_image(tiny_policy):
    """feature_pooling: last -> phi is the hidden state that predicts the first action token."""
    policy = tiny_policy(feature_pooling="last")
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8)
    same_image = images[:1].repeat(2, 1, 1, 1)
    prompts = policy.encode([WORDS[0], "pick up a blue box"])  # different lengths: left padding
    out = policy.evaluate(same_image, prompts, torch.zeros(2, 1, dtype=torch.long))
    assert (out.phi[0] - out.phi[1]).abs().max() > 1e-4  # the goal shows
    hidden, _ = policy.backbone(prompts.input_ids, prompts.attention_mask, policy.backbone.preprocess(same_image))
    assert torch.allclose(out.phi, hidden[:, -1], atol=1e-6)
    same_goal = policy.encode([WORDS[0]] * 2)
    out = policy.evaluate(images, same_goal, torch.zeros(2, 1, dtype=torch.long))
    assert (out.phi[0] - out.phi[1]).abs().max() > 1e-4  # the image shows
    with pytest.raises(ValueError, match="feature_pooling='max'"):
        tiny_policy(feature_pooling="max")


def test_flat_image_features_keep_each_patch_in_place(tiny_policy):
    """feature_pooling: image_flat -> phi is the image positions' last hidden states in patch
    order, [B, patches x H]; a CRL module's critics size themselves from phi's and emb's widths."""
    from modules.crl_module import CRLModule

    policy = tiny_policy(feature_pooling="image_flat")
    h, n_img = policy.backbone.hidden_size, policy.backbone.image_token_count
    assert (policy.feature_dim, policy.goal_dim) == (n_img * h, h) == (49 * 32, 32)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8)
    prompts = policy.encode([WORDS[0], "pick up a blue box"])  # different lengths: left padding
    out = policy.evaluate(images, prompts, torch.zeros(2, 1, dtype=torch.long))
    hidden, _ = policy.backbone(prompts.input_ids, prompts.attention_mask, policy.backbone.preprocess(images))
    for b in range(2):
        image_rows = hidden[b, prompts.image_mask[b]]  # [49, H], patch order
        assert torch.equal(out.phi[b].view(n_img, h), image_rows)
    module = CRLModule(policy, critic_hidden_sizes=[8])
    assert module.critic.net[0].in_features == n_img * h + h
    assert module.critic(out.phi, out.emb).shape == (2,)


def test_prompt_layout(tiny_policy):
    policy = tiny_policy()
    tok = policy.backbone.tokenizer
    p = policy.encode(["go to the red ball"])
    ids = p.input_ids[0].tolist()
    assert ids[0] == tok.bos_token_id
    assert ids[1:50] == [policy.backbone.image_token_id] * 49
    text = tok.convert_ids_to_tokens(ids[50:])
    assert text == ["in", ":", "what", "action", "should", "the", "robot", "take", "to",
                    "go", "to", "the", "red", "ball", "?", "out", ":"]
    goal = [t for t, g in zip(text, p.goal_mask[0, 50:].tolist()) if g]
    assert goal == ["go", "to", "the", "red", "ball"]
    # action tokens are the vocabulary's last ids
    assert policy.action_ids.tolist() == list(range(len(tok) - 3, len(tok)))


def test_every_trainable_parameter_gets_a_gradient(tiny_policy):
    """DDP (find_unused_parameters=False) needs a gradient for every trainable parameter
    from one training forward: action log-probs, entropy and the critic features."""
    from modules.critics import GoalConditionedCritic

    policy = tiny_policy(action_tokens=2, action_bins=5)
    prompts = policy.encode(WORDS[:2])
    images = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8)
    out = policy.evaluate(images, prompts, torch.tensor([[0, 1], [2, 3]]))
    critic = GoalConditionedCritic(policy.feature_dim, [8])
    (out.log_prob.sum() + out.entropy.sum() + critic(out.phi, out.emb).sum()).backward()
    missing = [n for n, p in policy.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    frozen = [n for n, p in policy.named_parameters() if not p.requires_grad]
    assert frozen and all("post_layernorm" in n for n in frozen)


def test_action_tokens_are_the_tail_of_the_base_vocabulary_not_of_padded_embeddings(tiny_policy):
    """OpenVLA: action ids 31744..31999 although the tokenizer adds a pad id (32000) and the
    embedding is padded to 32064 rows; the tail is taken from tokenizer.vocab_size."""
    policy = tiny_policy()
    bb = policy.backbone
    base = bb.tokenizer.vocab_size
    assert policy.action_ids.tolist() == list(range(base - 3, base))
    bb.tokenizer.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    bb.model.resize_token_embeddings(base + 1 + 64)  # an added token and padding rows
    assert bb.vocab_size == base + 65 and bb.tokenizer.vocab_size == base
    assert bb.action_token_ids(3).tolist() == list(range(base - 3, base))
