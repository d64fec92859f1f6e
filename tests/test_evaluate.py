"""COCO evaluation on hand-built cases whose AP follows from pycocotools' 101-point rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ssod_deploy.evaluate import coco_evaluate, detections_to_coco, format_table

# 101 recall thresholds 0, 0.01, ..., 1; a precision curve that is p up to recall 0.5 and
# 0 beyond covers the 51 thresholds <= 0.5.
HALF = 51 / 101


def _gt(with_optional_fields: bool = False) -> dict:
    anns = [
        {"image_id": 1, "category_id": 7, "bbox": [10, 10, 40, 40]},
        {"image_id": 2, "category_id": 7, "bbox": [20, 30, 30, 30]},
    ]
    if with_optional_fields:
        for i, a in enumerate(anns):
            a.update(id=i, iscrowd=0, area=a["bbox"][2] * a["bbox"][3])  # id 0 on purpose
    return {
        "images": [{"id": 1, "width": 64, "height": 64}, {"id": 2, "width": 64, "height": 64}],
        "categories": [{"id": 7, "name": "digit"}],
        "annotations": anns,
    }


def _det(image_id: int, bbox: list[float], score: float, cat: int = 7) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score}


@pytest.mark.parametrize("optional_fields", [False, True])
def test_perfect_detections(optional_fields: bool) -> None:
    dets = [_det(1, [10, 10, 40, 40], 0.9), _det(2, [20, 30, 30, 30], 0.8)]
    res = coco_evaluate(_gt(optional_fields), dets)
    m = res["metrics"]
    assert m["mAP50-95"] == pytest.approx(1.0)
    assert m["mAP50"] == pytest.approx(1.0) and m["mAP75"] == pytest.approx(1.0)
    # 900 px^2 is "small" (< 32^2), 1600 "medium"; nothing is "large" -> NaN, not -1
    assert m["mAP_small"] == pytest.approx(1.0) and m["mAP_medium"] == pytest.approx(1.0)
    assert math.isnan(m["mAP_large"])
    (row,) = res["per_class"]
    assert row == {"class_id": 7, "name": "digit", "AP50-95": pytest.approx(1.0),
                   "AP50": pytest.approx(1.0), "n_gt": 2}


def test_one_missed_one_false_positive_below_the_hit() -> None:
    # TP (0.9) then FP (0.5): precision 1 up to recall 0.5, then nothing -> AP = 51/101
    dets = [_det(1, [10, 10, 40, 40], 0.9), _det(2, [0, 0, 8, 8], 0.5)]
    res = coco_evaluate(_gt(), dets)
    assert res["metrics"]["mAP50"] == pytest.approx(HALF, abs=1e-6)
    assert res["metrics"]["mAP50-95"] == pytest.approx(HALF, abs=1e-6)
    assert res["per_class"][0]["AP50"] == pytest.approx(HALF, abs=1e-6)


def test_false_positive_ranked_above_the_hit() -> None:
    # FP (0.9) then TP (0.5): interpolated precision is 0.5 up to recall 0.5 -> AP = 0.5*51/101
    dets = [_det(2, [0, 0, 8, 8], 0.9), _det(1, [10, 10, 40, 40], 0.5)]
    res = coco_evaluate(_gt(), dets)
    assert res["metrics"]["mAP50"] == pytest.approx(0.5 * HALF, abs=1e-6)


def test_iou_dependent_match() -> None:
    # one gt, one det with IoU 0.72: a hit at thresholds 0.50..0.70 (5 of 10), a miss above
    gt = {"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100]}]}
    res = coco_evaluate(gt, [_det(1, [0, 0, 100, 72], 0.9, cat=1)])
    m = res["metrics"]
    assert m["mAP50"] == pytest.approx(1.0)
    assert m["mAP75"] == pytest.approx(0.0)
    assert m["mAP50-95"] == pytest.approx(0.5)
    assert m["mAP_large"] == pytest.approx(0.5)


def test_empty_detections_score_zero() -> None:
    res = coco_evaluate(_gt(), [])
    assert res["metrics"]["mAP50-95"] == 0.0 and res["metrics"]["mAP50"] == 0.0
    assert res["per_class"][0]["AP50"] == 0.0 and res["per_class"][0]["n_gt"] == 2


def test_per_class_and_table() -> None:
    gt = _gt()
    gt["categories"].append({"id": 9, "name": "very_long_class_name"})
    gt["annotations"].append({"image_id": 2, "category_id": 9, "bbox": [0, 0, 10, 10]})
    dets = [_det(1, [10, 10, 40, 40], 0.9), _det(2, [20, 30, 30, 30], 0.8)]  # class 9 missed
    res = coco_evaluate(gt, dets)
    by_id = {r["class_id"]: r for r in res["per_class"]}
    assert by_id[7]["AP50"] == pytest.approx(1.0) and by_id[9]["AP50"] == 0.0
    assert by_id[9]["n_gt"] == 1
    assert res["metrics"]["mAP50"] == pytest.approx(0.5)  # mean over the two classes
    table = format_table(res)
    assert "very_long_class_name" in table and "mAP50-95" in table
    lines = table.splitlines()
    assert any(line.split()[:2] == ["7", "digit"] for line in lines)


def test_bad_detection_ids_are_reported() -> None:
    with pytest.raises(ValueError, match="image_id 99"):
        coco_evaluate(_gt(), [_det(99, [0, 0, 1, 1], 0.5)])
    with pytest.raises(ValueError, match="category_id 3"):
        coco_evaluate(_gt(), [_det(1, [0, 0, 1, 1], 0.5, cat=3)])


def test_detections_to_coco_roundtrip() -> None:
    boxes = [np.array([[10, 10, 50, 50]], np.float32), np.array([[20, 30, 50, 60], [0, 0, 8, 8]])]
    scores = [np.array([0.9]), np.array([0.8, 0.1])]
    labels = [np.array([0]), np.array([0, 0])]
    dets = detections_to_coco(np.array([1, 2]), boxes, scores, labels, {0: 7})
    assert [d["bbox"] for d in dets] == [[10, 10, 40, 40], [20, 30, 30, 30], [0, 0, 8, 8]]
    assert all(type(d["image_id"]) is int and d["category_id"] == 7 for d in dets)
    assert coco_evaluate(_gt(), dets)["metrics"]["mAP50-95"] == pytest.approx(1.0)
    assert detections_to_coco([1], [np.zeros((0, 4))], [np.zeros(0)], [np.zeros(0)], [7]) == []
    with pytest.raises(ValueError, match="label"):
        detections_to_coco([1], boxes[:1], scores[:1], [np.array([3])], [7])


def test_confusion_matrix_counts_right_wrong_missed_and_background() -> None:
    """Two classes (ids 3, 5). Image 1: a right class-3 box, a class-5 object found as class 3 (the
    wrong class on a right box), a duplicate of it (on background), a low-score box (ignored). Image 2:
    a missed class-5 object and a detection on nothing."""
    from ssod_deploy.evaluate import confusion_matrix, top_confusions

    gt = {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "categories": [{"id": 5, "name": "five"}, {"id": 3, "name": "three"}],
        "annotations": [
            {"image_id": 1, "category_id": 3, "bbox": [0, 0, 20, 20]},
            {"image_id": 1, "category_id": 5, "bbox": [50, 50, 20, 20]},
            {"image_id": 2, "category_id": 5, "bbox": [10, 10, 20, 20]},
        ],
    }
    dets = [
        _det(1, [1, 1, 20, 20], 0.9, cat=3),     # right
        _det(1, [50, 50, 20, 20], 0.8, cat=3),   # five seen as three (IoU 1)
        _det(1, [52, 52, 20, 20], 0.7, cat=5),   # the same object again: its gt is taken -> background
        _det(1, [0, 0, 20, 20], 0.1, cat=5),     # below conf 0.25: not counted
        _det(2, [70, 70, 10, 10], 0.5, cat=5),   # on nothing
    ]
    m = confusion_matrix(gt, dets)  # order: sorted ids (3, 5), then background
    assert m.tolist() == [
        [1, 1, 0],   # predicted three: true three, true five, background
        [0, 0, 2],   # predicted five: the duplicate and the box on nothing
        [0, 1, 0],   # missed: the five of image 2
    ]
    assert m.sum() == 5
    assert top_confusions(m, ["three", "five"]) == ["five -> three: 1 of 2 five boxes"]
    # IoU 0.9: the 'right' box (IoU 0.82) no longer matches: a missed three and a box on background
    assert confusion_matrix(gt, dets, iou=0.9).tolist() == [[0, 1, 1], [0, 0, 2], [1, 1, 0]]
    # the explicit order puts five first
    assert confusion_matrix(gt, dets, category_ids=[5, 3]).tolist() == [[0, 0, 2], [1, 1, 0], [1, 0, 0]]
