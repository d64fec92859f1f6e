"""Box geometry: letterbox round trips, IoU values, NMS against hand cases and torchvision."""

from __future__ import annotations

import numpy as np
import pytest

from ssod_deploy.boxes import (
    batched_nms,
    box_area,
    box_iou,
    letterbox,
    letterbox_params,
    letterbox_shape,
    nms,
    postprocess_dense,
    unletterbox_boxes,
    xywh2xyxy,
    xyxy2xywh,
)


def _random_boxes(rng: np.random.Generator, n: int, size: float = 100.0) -> np.ndarray:
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(2, size / 3, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_xywh_roundtrip_and_area() -> None:
    xywh = np.array([[10, 20, 4, 6], [0, 0, 2, 2]], np.float32)
    xyxy = xywh2xyxy(xywh)
    np.testing.assert_allclose(xyxy, [[8, 17, 12, 23], [-1, -1, 1, 1]])
    np.testing.assert_allclose(xyxy2xywh(xyxy), xywh)
    np.testing.assert_allclose(box_area(xyxy), [24, 4])
    assert xywh2xyxy(np.array([[1, 1, 2, 2]])).dtype.kind == "f"  # ints promoted, not truncated


def test_box_iou_known_values() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 2, 2]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 5]], np.float32)
    iou = box_iou(a, b)
    assert iou.shape == (2, 4)
    np.testing.assert_allclose(iou[0], [1.0, 50 / 150, 0.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(iou[1], [0.04, 0.0, 0.0, 4 / 50], atol=1e-6)
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 4)


@pytest.mark.parametrize("hw", [(48, 80), (80, 48), (64, 64), (300, 1000), (7, 101)])
@pytest.mark.parametrize("imgsz", [64, 96])
def test_letterbox_places_image_where_params_say(hw: tuple[int, int], imgsz: int) -> None:
    h, w = hw
    img = np.full((h, w, 3), 200, np.uint8)
    out, params = letterbox(img, imgsz)
    scale, px, py = params
    assert out.shape == (imgsz, imgsz, 3) and out.dtype == np.uint8
    assert scale == pytest.approx(min(imgsz / h, imgsz / w))
    new_w, new_h = round(w * scale), round(h * scale)
    assert abs(px - (imgsz - new_w) / 2) <= 0.5 and abs(py - (imgsz - new_h) / 2) <= 0.5
    content = np.argwhere(out[..., 0] == 200)
    (y0, x0), (y1, x1) = content.min(0), content.max(0)
    assert (x0, y0) == (px, py)
    assert (x1 + 1 - x0, y1 + 1 - y0) == (new_w, new_h)
    assert (out[..., 0] == 114).sum() == imgsz * imgsz - new_w * new_h


def test_rect_letterbox_is_the_smallest_stride_rectangle_and_inverts() -> None:
    # a 640x480 photo at 320: resized to 320x240, padded to 320x256 (8 rows top, 8 bottom)
    assert letterbox_shape(480, 640, 320, 32) == (256, 320)
    assert letterbox_shape(640, 480, 320, 32) == (320, 256)
    assert letterbox_shape(480, 640, 320) == (320, 320)  # no stride: the square
    assert letterbox_shape(100, 3000, 320, 32) == (32, 320)  # at least one stride
    img = np.full((480, 640, 3), 200, np.uint8)
    out, (scale, px, py) = letterbox(img, 320, stride=32)
    assert out.shape == (256, 320, 3) and (scale, px, py) == (0.5, 0.0, 8.0)
    assert (out[:8] == 114).all() and (out[8:248] == 200).all() and (out[248:] == 114).all()
    boxes = np.array([[0, 0, 640, 480], [33, 47, 101, 300]], np.float32)
    in_net = boxes * scale + np.array([px, py, px, py], np.float32)
    np.testing.assert_allclose(unletterbox_boxes(in_net, (scale, px, py), (480, 640)), boxes, atol=1e-3)
    with pytest.raises(ValueError, match="invalid sizes"):
        letterbox_shape(0, 640, 320, 32)


def test_letterbox_unletterbox_roundtrip() -> None:
    h, w, imgsz = 75, 130, 96
    boxes = np.array([[0, 0, 130, 75], [10.5, 20, 50, 60], [100, 5, 129, 74]], np.float32)
    scale, px, py = letterbox_params(h, w, imgsz)
    in_net = boxes * scale + np.array([px, py, px, py], np.float32)
    back = unletterbox_boxes(in_net, (scale, px, py), (h, w))
    np.testing.assert_allclose(back, boxes, atol=1e-3)
    # boxes reaching into the padding are clipped to the image
    outside = np.array([[-5, -5, imgsz + 5, imgsz + 5]], np.float32)
    np.testing.assert_allclose(unletterbox_boxes(outside, (scale, px, py), (h, w)), [[0, 0, w, h]])


def test_letterbox_content_matches_boxes() -> None:
    """A bright square in the original lands where the forward box mapping says."""
    h, w, imgsz = 120, 200, 64
    img = np.zeros((h, w, 3), np.uint8)
    img[40:80, 100:160] = 255
    out, params = letterbox(img, imgsz)
    scale, px, py = params
    box = np.array([100, 40, 160, 80]) * scale + np.array([px, py, px, py])
    bright = np.argwhere(out[..., 0] > 127)
    (y0, x0), (y1, x1) = bright.min(0), bright.max(0) + 1
    np.testing.assert_allclose([x0, y0, x1, y1], box, atol=1.0)
    np.testing.assert_allclose(unletterbox_boxes(np.array([[x0, y0, x1, y1]]), params, (h, w)),
                               [[100, 40, 160, 80]], atol=1.0 / scale)


def test_nms_hand_case() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5]], np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.6], np.float32)
    # box1 (0.9) suppresses box0 (IoU 0.68) and box3; box2 is far away
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [1, 2])
    np.testing.assert_array_equal(nms(boxes, scores, 0.7), [1, 0, 2])  # 0.68 <= 0.7 survives
    np.testing.assert_array_equal(nms(boxes, scores, 0.99), [1, 0, 2, 3])
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).shape == (0,)


def test_batched_nms_keeps_other_classes() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0.5, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    classes = np.array([0, 1, 0, 1])
    np.testing.assert_array_equal(batched_nms(boxes, scores, classes, 0.5), [0, 1, 3])
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [0, 3])
    # negative coordinates must not let classes overlap after offsetting
    neg = boxes - 1000
    np.testing.assert_array_equal(batched_nms(neg, scores, classes, 0.5), [0, 1, 3])


def test_nms_matches_torchvision_on_random_boxes() -> None:
    torch = pytest.importorskip("torch")
    tv_ops = pytest.importorskip("torchvision.ops")
    rng = np.random.default_rng(0)
    for trial in range(5):
        boxes = _random_boxes(rng, 300)
        scores = rng.permutation(300).astype(np.float32) / 300  # distinct scores: unique order
        classes = rng.integers(0, 4, 300)
        ref = tv_ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.45).numpy()
        np.testing.assert_array_equal(nms(boxes, scores, 0.45), ref)
        ref_b = tv_ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                   torch.from_numpy(classes), 0.45).numpy()
        np.testing.assert_array_equal(batched_nms(boxes, scores, classes, 0.45), ref_b)


def _dense(boxes_xywh: list[list[float]], cls_scores: list[list[float]]) -> np.ndarray:
    """(1, 4 + nc, A) the way YOLO heads emit it."""
    x = np.concatenate([np.array(boxes_xywh, np.float32), np.array(cls_scores, np.float32)], 1)
    return x.T[None]


def test_postprocess_dense_hand_case() -> None:
    pred = _dense(
        [[50, 50, 20, 20], [51, 50, 20, 20], [50, 50, 20, 20], [10, 10, 4, 4], [80, 80, 10, 10]],
        [[0.9, 0.1], [0.8, 0.0], [0.2, 0.7], [0.1, 0.05], [0.0, 0.6]],
    )
    (boxes, scores, labels), = postprocess_dense(pred, conf=0.25, iou=0.5)
    # anchor 1 is suppressed by anchor 0 (same class), anchor 2 survives (other class),
    # anchor 3 is below conf
    np.testing.assert_allclose(scores, [0.9, 0.7, 0.6])
    np.testing.assert_array_equal(labels, [0, 1, 1])
    np.testing.assert_allclose(boxes, [[40, 40, 60, 60], [40, 40, 60, 60], [75, 75, 85, 85]])
    assert boxes.dtype == np.float32 and labels.dtype == np.int64

    (b, s, l), = postprocess_dense(pred, conf=0.25, iou=0.5, agnostic=True)
    np.testing.assert_allclose(s, [0.9, 0.6])
    (b, s, l), = postprocess_dense(pred, conf=0.25, iou=0.5, max_det=2)
    np.testing.assert_allclose(s, [0.9, 0.7])


def test_postprocess_dense_multi_label_and_empty() -> None:
    pred = _dense([[50, 50, 20, 20], [10, 10, 4, 4]], [[0.9, 0.5], [0.1, 0.05]])
    (b, s, l), = postprocess_dense(pred, conf=0.25, iou=0.5, multi_label=True)
    np.testing.assert_allclose(s, [0.9, 0.5])
    np.testing.assert_array_equal(l, [0, 1])
    (b, s, l), = postprocess_dense(pred, conf=0.25, iou=0.5)
    np.testing.assert_array_equal(l, [0])
    empty = postprocess_dense(np.zeros((2, 6, 10), np.float32), conf=0.25)
    assert len(empty) == 2 and all(x[0].shape == (0, 4) for x in empty)


def test_postprocess_dense_max_nms_keeps_best() -> None:
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 1000, (200, 2))
    boxes = np.concatenate([xy, np.full((200, 2), 5.0)], 1)  # tiny, non-overlapping mostly
    scores = rng.uniform(0.3, 1.0, (200, 1))
    pred = np.concatenate([boxes, scores], 1).T[None].astype(np.float32)
    (_, s, _), = postprocess_dense(pred, conf=0.25, iou=0.99, max_nms=10)
    assert len(s) == 10
    np.testing.assert_allclose(np.sort(s)[::-1], np.sort(scores[:, 0])[::-1][:10], rtol=1e-6)


def test_nms_max_keep_equals_slicing() -> None:
    rng = np.random.default_rng(2)
    boxes = _random_boxes(rng, 200)
    scores = rng.uniform(0, 1, 200)
    full = nms(boxes, scores, 0.5)
    assert len(full) > 20
    np.testing.assert_array_equal(nms(boxes, scores, 0.5, max_keep=20), full[:20])


@pytest.mark.parametrize("multi_label", [False, True])
def test_postprocess_dense_matches_ultralytics(multi_label: bool) -> None:
    torch = pytest.importorskip("torch")
    try:
        from ultralytics.utils.nms import non_max_suppression
    except ImportError:
        ops = pytest.importorskip("ultralytics.utils.ops")
        non_max_suppression = ops.non_max_suppression
    rng = np.random.default_rng(3)
    a, nc = 400, 3
    xy = rng.uniform(0, 160, (2, 2, a))
    wh = rng.uniform(4, 40, (2, 2, a))
    cls = rng.uniform(0, 1, (2, nc, a)) ** 3
    pred = np.concatenate([xy, wh, cls], 1).astype(np.float32)
    ref = non_max_suppression(torch.from_numpy(pred), 0.25, 0.6, multi_label=multi_label, max_det=50)
    mine = postprocess_dense(pred, 0.25, 0.6, max_det=50, multi_label=multi_label)
    for r, (b, s, lab) in zip(ref, mine):
        r = r.numpy()
        assert len(r) == len(b) > 0
        np.testing.assert_allclose(b, r[:, :4], atol=1e-3)
        np.testing.assert_allclose(s, r[:, 4], rtol=1e-6)
        np.testing.assert_array_equal(lab, r[:, 5].astype(np.int64))
