"""The continual-learning metrics on a known R."""
import numpy as np

from callbacks.metrics import continual_metrics, heatmap_image

R = [[0.9, 0.2, 0.1],
     [0.5, 0.8, 0.3],
     [0.4, 0.6, 0.7]]
b = [0.3, 0.1, 0.2]


def test_metrics_by_hand():
    m = continual_metrics(R, b)
    assert np.isclose(m["FAR"], (0.4 + 0.6 + 0.7) / 3)
    assert np.isclose(m["BWT"], ((0.4 - 0.9) + (0.6 - 0.8)) / 2)
    assert np.isclose(m["FT"], ((0.2 - 0.1) + (0.3 - 0.2)) / 2)
    assert np.isclose(m["F"], ((0.9 - 0.4) + (0.8 - 0.6)) / 2)
    assert np.isclose(m["FWT"], (0.9 + 0.8 + 0.7) / 3)
    nbt0 = ((0.9 - 0.5) + (0.9 - 0.4)) / 2
    nbt1 = 0.8 - 0.6
    assert np.isclose(m["NBT"], (nbt0 + nbt1) / 2)
    auc = [(0.9 + 0.5 + 0.4) / 3, (0.8 + 0.6) / 2, 0.7 / 1]
    assert np.isclose(m["AUC"], np.mean(auc))


def test_fwt_uses_in_task_evaluations():
    m = continual_metrics(R, b, in_task=[[0.5, 0.9], [0.8], [0.1, 0.7]])
    assert np.isclose(m["FWT"], (0.7 + 0.8 + 0.4) / 3)


def test_heatmap_shape_and_values():
    img = heatmap_image(R, cell=2)
    assert img.shape == (3, 6, 6) and img.dtype == np.uint8
    assert img[1, 0, 0] == int(0.9 * 255)


def test_one_task_leaves_transfer_and_forgetting_undefined():
    """With one task nothing follows it: BWT, FT, F and NBT are undefined (None in metrics.json), not 0."""
    m = continual_metrics([[0.7]], [0.2])
    assert {k for k, v in m.items() if v is None} == {"BWT", "FT", "F", "NBT"}
    assert m["FAR"] == m["FWT"] == m["AUC"] == 0.7


def test_without_a_starting_score_only_forward_transfer_is_undefined():
    """PerTaskEvaluation(evaluate_before=False) leaves b null: FT needs it, nothing else does."""
    with_b, without_b = continual_metrics(R, b), continual_metrics(R, None)
    assert without_b["FT"] is None
    assert {k: v for k, v in without_b.items() if k != "FT"} == {k: v for k, v in with_b.items() if k != "FT"}
