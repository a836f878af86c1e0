"""OpenVLA action tokens -> continuous actions: values worked by hand, and the checkpoint's stats."""
import json

import numpy as np
import pytest
import torch

from modules.policy.action_codec import load_norm_stats, make_action_codec

STATS = {"libero_goal_no_noops": {"action": {"q01": [-1.0, 0.0, 5.0], "q99": [1.0, 2.0, 9.0],
                                             "mask": [True, True, False]}}}


def test_decode_by_hand_with_denormalisation(tmp_path):
    (tmp_path / "dataset_statistics.json").write_text(json.dumps(STATS))
    codec = make_action_codec(256, str(tmp_path), "libero_goal_no_noops")
    # kit index k is the vocab-tail offset: OpenVLA's bin d = clip(255 - k, 0, 254),
    # value = centre of bin d of linspace(-1, 1, 256) = -1 + (2 d + 1) / 255
    k = torch.tensor([[255, 255, 255], [0, 0, 0], [128, 128, 128]])
    centre = torch.tensor([-1 + 1 / 255, 1 - 1 / 255, 0.0], dtype=torch.float64)
    out = codec.decode(k).double()
    # dims 0-1 de-normalised: 0.5 (v + 1)(q99 - q01) + q01; dim 2 (mask False) kept as is
    expected = torch.stack([centre, centre + 1.0, centre], -1)
    assert torch.allclose(out, expected, atol=1e-6)
    # k = 1 is bin 254 as well (OpenVLA clips d to 254): the last two offsets decode alike
    assert torch.equal(codec.decode(torch.tensor([[1, 1, 1]])), codec.decode(torch.tensor([[0, 0, 0]])))


def test_stats_from_config_json_and_clear_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"norm_stats": STATS, "hidden_size": 8}))
    assert load_norm_stats(str(tmp_path)) == STATS
    with pytest.raises(ValueError, match="unnorm_key='bridge_orig'"):
        make_action_codec(256, str(tmp_path), "bridge_orig")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="norm_stats="):
        make_action_codec(256, str(empty), "libero_goal_no_noops")


def test_round_trip_without_stats_is_within_half_a_bin():
    codec = make_action_codec(256)
    a = torch.linspace(-0.99, 0.99, 101)[:, None].repeat(1, 7)
    back = codec.decode(codec.encode(a))
    assert (back - a).abs().max() <= 1 / 255 + 1e-6


def test_policy_env_action_decodes_several_tokens(tiny_policy, tmp_path):
    (tmp_path / "stats.json").write_text(json.dumps(STATS))
    policy = tiny_policy(action_tokens=3, action_bins=256)
    policy.codec = make_action_codec(256, str(tmp_path / "stats.json"), "libero_goal_no_noops")
    action = policy.env_action(torch.tensor([[255, 0, 128]]))
    assert action.dtype == torch.float32
    assert torch.allclose(action, torch.tensor([[-1 + 1 / 255, 2 - 1 / 255, 0.0]]), atol=1e-6)


# -- OpenVLA's own code as the reference (prismatic/vla/action_tokenizer.py, predict_action) ----------
def _openvla_window_ids(actions: np.ndarray, bins: int = 256) -> np.ndarray:
    edges = np.linspace(-1.0, 1.0, bins)  # float64
    return bins - np.digitize(np.clip(actions, -1.0, 1.0), edges)


def test_bin_edges_are_openvlas_float64_ones():
    """Actions within a float32 rounding of a bin edge: torchrl's float32 edges put some of them one
    bin off; the kit's codec gives OpenVLA's bin for all 700,000."""
    from torchrl.data import VocabTailActionTokenizer

    edges = np.linspace(-1.0, 1.0, 256)
    near = np.concatenate([edges, np.nextafter(edges, 2), np.nextafter(edges, -2)]).astype(np.float32)
    rng = np.random.default_rng(0)
    actions = np.concatenate([near, rng.uniform(-1.1, 1.1, 700_000 - len(near)).astype(np.float32)])
    expected = _openvla_window_ids(actions.astype(np.float64))
    kit = make_action_codec(256).encode(torch.from_numpy(actions)).numpy()
    torchrl = VocabTailActionTokenizer(256).encode(torch.from_numpy(actions)).numpy()
    assert np.array_equal(kit, expected)
    assert (torchrl != expected).sum() > 0  # the reference differs from the float32 edges here


def test_denormalisation_is_predict_actions_without_epsilon(tmp_path):
    """OpenVLA's predict_action: 0.5 * (a + 1) * (q99 - q01) + q01 in float64 (OpenVLA-OFT adds 1e-8
    to the range, which moves actions of a narrow dimension)."""
    stats = {"k": {"action": {"q01": [-1e-7, 0.25], "q99": [1e-7, 0.75], "mask": [True, True]}}}
    (tmp_path / "dataset_statistics.json").write_text(json.dumps(stats))
    codec = make_action_codec(256, str(tmp_path), "k")
    tokens = torch.arange(256)[:, None].repeat(1, 2)
    edges = np.linspace(-1.0, 1.0, 256)
    centres = ((edges[:-1] + edges[1:]) / 2)[np.clip(256 - tokens.numpy() - 1, 0, 254)]
    q01, q99 = np.array([-1e-7, 0.25]), np.array([1e-7, 0.75])
    expected = (0.5 * (centres + 1) * (q99 - q01) + q01).astype(np.float32)
    assert np.array_equal(codec.decode(tokens).numpy(), expected)
    with_epsilon = (0.5 * (centres + 1) * (q99 - q01 + 1e-8) + q01).astype(np.float32)
    assert not np.array_equal(with_epsilon, expected)
