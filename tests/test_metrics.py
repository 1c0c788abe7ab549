"""Confusion matrix, IoU and classification AP on hand-computed examples."""
from __future__ import annotations

import math

import numpy as np
import pytest

from psa_ray.ops.metrics import average_precision, confusion_matrix, iou_per_class, mean_iou


def test_confusion_matrix_by_hand() -> None:
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = confusion_matrix(pred, gt, 4)
    expected = np.zeros((4, 5), np.int64)  # the last column: predictions outside the classes
    expected[0, 0] = 1  # gt 0 -> 0
    expected[0, 1] = 1  # gt 0 -> 1
    expected[1, 1] = 2  # gt 1 -> 1 twice
    expected[1, 0] = 1  # gt 1 -> 0
    expected[2, 2] = 1  # gt 2 -> 2
    expected[2, 0] = 1  # gt 2 -> 0; the 255 pixel is skipped
    assert cm.dtype == np.int64 and cm.shape == (4, 5)
    np.testing.assert_array_equal(cm, expected)
    iou = iou_per_class(cm)
    # class 0: TP 1, FP 2 (gt 1, gt 2), FN 1 -> 1/4; class 1: TP 2, FP 1, FN 1 -> 2/4;
    # class 2: TP 1, FN 1 -> 1/2; class 3: absent from both -> NaN.
    np.testing.assert_allclose(iou[:3], [0.25, 0.5, 0.5])
    assert math.isnan(iou[3])
    assert mean_iou(cm) == pytest.approx((0.25 + 0.5 + 0.5) / 3)


def test_out_of_range_predictions_are_wrong_and_never_crash() -> None:
    gt = np.array([0, 1, 1, 2])
    pred = np.array([0, 255, -1, 7])
    cm = confusion_matrix(pred, gt, 3)
    assert cm.sum() == 4
    assert np.trace(cm) == 1  # only the in-range, right prediction counts as right
    np.testing.assert_array_equal(cm.sum(axis=1), [1, 2, 1])
    assert confusion_matrix(np.zeros(0, int), np.zeros(0, int), 3).sum() == 0
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 1]), np.array([0, 5]), 3)
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 1, 2]), np.array([0, 1]), 3)


def test_mean_iou_without_any_class_is_nan() -> None:
    assert math.isnan(mean_iou(np.zeros((3, 3), np.int64)))


def test_average_precision_by_hand() -> None:
    scores = np.array([[0.9, 0.3, 0.2],
                       [0.8, 0.1, 0.7],
                       [0.7, 0.4, 0.6],
                       [0.6, 0.2, 0.1],
                       [0.5, 0.5, 0.9]])
    targets = np.array([[1, 0, 1],
                        [0, 0, 1],
                        [1, 0, 1],
                        [0, 0, 1],
                        [1, 0, 1]])
    ap = average_precision(scores, targets)
    # class 0 ranking: + - + - + -> precisions 1/1, 2/3, 3/5 at the positives.
    assert ap[0] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert math.isnan(ap[1])  # no positives
    assert ap[2] == pytest.approx(1.0)
    # the mAP the CAM network's held-out AP reports (`train.evaluate.classifier_ap`): classes without positives left out
    assert np.nanmean(ap) == pytest.approx(((1 + 2 / 3 + 3 / 5) / 3 + 1.0) / 2)


def test_average_precision_ranks_and_ties() -> None:
    # class 0: positives ranked 2nd and 4th -> (1/2 + 2/4) / 2; class 1: a tie of one positive and
    # one negative at the top counts as one threshold -> precision 1/2 whatever the order.
    scores = np.array([[0.9, 0.5], [0.8, 0.5], [0.7, 0.1], [0.6, 0.0]])
    targets = np.array([[0, 0], [1, 1], [0, 0], [1, 0]])
    np.testing.assert_allclose(average_precision(scores, targets), [0.5, 0.5])
    np.testing.assert_allclose(average_precision(scores[::-1], targets[::-1]), [0.5, 0.5])
    assert np.all(np.isnan(average_precision(scores, np.zeros_like(targets))))  # no positive: no mAP (None)
    with pytest.raises(ValueError):
        average_precision(scores, targets[:, :1])
