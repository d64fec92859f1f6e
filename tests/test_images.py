"""Image reading: every mode comes back as (H, W, 3) uint8 RGB, every bad file as ImageReadError."""

from __future__ import annotations

import logging
import os
import pickle
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from ssod_deploy.images import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    SkipReport,
    discover_images,
    read_image,
    read_image_size,
    read_image_with_size,
)

H, W = 48, 80  # non-square so orientation mistakes show up in shapes


def _rgb(h: int = H, w: int = W) -> np.ndarray:
    # smooth gradients survive JPEG well enough to compare values loosely
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, 90)], -1)
    return img.astype(np.uint8)


def _check_rgb(arr: np.ndarray, hw: tuple[int, int] = (H, W)) -> None:
    assert arr.dtype == np.uint8
    assert arr.shape == (*hw, 3)
    assert arr.flags.c_contiguous and arr.flags.writeable


# ------------------------------------------------------------------------------- good files


def test_rgb_jpeg(tmp_path: Path) -> None:
    p = tmp_path / "a.jpg"
    ref = _rgb()
    Image.fromarray(ref).save(p, quality=95)
    arr = read_image(p)
    _check_rgb(arr)
    assert np.abs(arr.astype(int) - ref).mean() < 4  # it is RGB, not BGR
    assert read_image_size(p) == (H, W)


def test_grayscale_png(tmp_path: Path) -> None:
    p = tmp_path / "g.png"
    g = _rgb()[..., 0]
    Image.fromarray(g, mode="L").save(p)
    arr = read_image(p)
    _check_rgb(arr)
    for c in range(3):
        np.testing.assert_array_equal(arr[..., c], g)


def test_rgba_png_composited_on_gray(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, : W // 2, 3] = 255  # left half opaque red, right half fully transparent
    Image.fromarray(rgba, mode="RGBA").save(p)
    arr = read_image(p)
    _check_rgb(arr)
    np.testing.assert_array_equal(arr[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(arr[0, -1], [114, 114, 114])


def test_palette_png(tmp_path: Path) -> None:
    p = tmp_path / "p.png"
    im = Image.fromarray(_rgb()).quantize(colors=16)
    assert im.mode == "P"
    im.save(p)
    arr = read_image(p)
    _check_rgb(arr)
    np.testing.assert_array_equal(arr, np.asarray(im.convert("RGB")))


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    p = tmp_path / "pt.png"
    idx = np.zeros((H, W), np.uint8)
    idx[:, W // 2 :] = 1
    im = Image.fromarray(idx, mode="P")
    im.putpalette([0, 0, 255, 255, 255, 255] + [0] * 762)
    im.save(p, transparency=1)
    arr = read_image(p)
    np.testing.assert_array_equal(arr[0, 0], [0, 0, 255])
    np.testing.assert_array_equal(arr[0, -1], [114, 114, 114])


def test_16bit_png_scaled_by_top_byte(tmp_path: Path) -> None:
    p = tmp_path / "d.png"
    v = np.linspace(0, 65535, H * W).reshape(H, W).astype(np.uint16)
    Image.fromarray(v).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    arr = read_image(p)
    _check_rgb(arr)
    np.testing.assert_array_equal(arr[..., 1], (v >> 8).astype(np.uint8))
    assert arr.max() == 255 and arr.min() == 0


def test_1bit_and_float_modes(tmp_path: Path) -> None:
    p1 = tmp_path / "b.png"
    bits = np.zeros((H, W), bool)
    bits[:, :10] = True
    Image.fromarray(bits).convert("1").save(p1)
    arr = read_image(p1)
    _check_rgb(arr)
    assert arr[0, 0].tolist() == [255, 255, 255] and arr[0, -1].tolist() == [0, 0, 0]

    pf = tmp_path / "f.tif"
    f = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    Image.fromarray(f, mode="F").save(pf)
    arr = read_image(pf)
    _check_rgb(arr)
    assert arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255


def test_cmyk_jpeg(tmp_path: Path) -> None:
    p = tmp_path / "c.jpg"
    ref = _rgb()
    Image.fromarray(ref).convert("CMYK").save(p, quality=95)
    with Image.open(p) as im:
        assert im.mode == "CMYK"
    arr = read_image(p)
    _check_rgb(arr)
    assert np.abs(arr.astype(int) - ref).mean() < 12


def test_exif_rotated_jpeg(tmp_path: Path) -> None:
    p = tmp_path / "r.jpg"
    ref = _rgb()
    ref[:8, :8] = [255, 0, 0]  # red marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(ref).save(p, exif=exif, quality=95)
    arr = read_image(p)
    _check_rgb(arr, (W, H))
    assert read_image_size(p) == (W, H)
    # after a 90 degree clockwise turn the stored top-left lands at the top-right
    assert arr[2, -3, 0] > 200 and arr[2, -3, 1] < 60
    assert arr[2, 2, 0] < 200 or arr[2, 2, 1] > 60


def test_lab_tiff(tmp_path: Path) -> None:
    p = tmp_path / "lab.tif"
    ref = _rgb()
    Image.fromarray(ref).convert("LAB").save(p)
    with Image.open(p) as im:
        assert im.mode == "LAB"
    arr = read_image(p)
    _check_rgb(arr)
    assert np.abs(arr.astype(int) - ref).mean() < 12


# -------------------------------------------------------------------------------- bad files


def _expect_error(path: Path, fragment: str, **kw) -> ImageReadError:
    with pytest.raises(ImageReadError) as ei:
        read_image(path, **kw)
    e = ei.value
    assert e.path == str(path)
    assert fragment in e.reason, e.reason
    assert str(e) == f"{path}: {e.reason}" and "\n" not in str(e)
    again = pickle.loads(pickle.dumps(e))  # crosses process pools intact
    assert (again.path, again.reason) == (e.path, e.reason)
    return e


def test_missing_file(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope.jpg", "file not found")
    with pytest.raises(ImageReadError, match="file not found"):
        read_image_size(tmp_path / "nope.jpg")


def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "z.jpg"
    p.touch()
    _expect_error(p, "empty file")
    with pytest.raises(ImageReadError, match="empty file"):
        read_image_size(p)


def test_text_named_jpg(tmp_path: Path) -> None:
    p = tmp_path / "t.jpg"
    p.write_text("this is not a picture\n")
    _expect_error(p, "not an image (unrecognised format)")
    with pytest.raises(ImageReadError, match="not an image"):
        read_image_size(p)


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_truncated_file(tmp_path: Path, fmt: str) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # importing ssod_deploy must not flip it
    good = tmp_path / f"good.{fmt}"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    bad = tmp_path / f"half.{fmt}"
    bad.write_bytes(data[: len(data) // 2])
    _expect_error(bad, "truncated or corrupt image data")
    _expect_error(bad, "truncated or corrupt image data", target_size=16)


def test_too_many_pixels_checked_from_header(tmp_path: Path) -> None:
    p = tmp_path / "big.png"
    Image.fromarray(_rgb()).save(p)
    e = _expect_error(p, "image too large", max_pixels=1000)
    assert e.reason == f"image too large: {W}x{H} pixels exceeds limit 1000"
    assert read_image(p, max_pixels=H * W).shape == (H, W, 3)  # limit is inclusive


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root reads anything")
def test_permission_denied(tmp_path: Path) -> None:
    p = tmp_path / "locked.jpg"
    Image.fromarray(_rgb()).save(p)
    p.chmod(0)
    try:
        _expect_error(p, "permission denied")
    finally:
        p.chmod(0o644)


def test_permission_error_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same check as above for root (CI containers), by making open() refuse."""
    import ssod_deploy.images as images_mod

    p = tmp_path / "locked.jpg"
    Image.fromarray(_rgb()).save(p)

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images_mod, "open", refuse, raising=False)
    _expect_error(p, "permission denied")


def test_unexpected_decoder_exception_is_wrapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "a.png"
    Image.fromarray(_rgb()).save(p)

    def boom(self):
        raise RuntimeError("decoder exploded\nsecond line")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    e = _expect_error(p, "cannot decode image (RuntimeError: decoder exploded second line)")
    assert isinstance(e.__cause__, RuntimeError)


def test_directory_named_like_image(tmp_path: Path) -> None:
    d = tmp_path / "folder.jpg"
    d.mkdir()
    _expect_error(d, "directory")


# ------------------------------------------------------------------------------ draft path


def test_jpeg_draft_returns_smaller_array_and_original_size(tmp_path: Path) -> None:
    p = tmp_path / "big.jpg"
    Image.fromarray(_rgb(400, 640)).save(p, quality=90)
    arr, hw = read_image_with_size(p, target_size=150)
    assert hw == (400, 640)
    assert arr.shape == (100, 160, 3)  # decoded at 1/4: longest side 160 >= 150
    assert max(arr.shape[:2]) >= 150
    # without target_size, or when the target is bigger than the image, no downscaling
    assert read_image_with_size(p)[0].shape == (400, 640, 3)
    assert read_image_with_size(p, target_size=1000)[0].shape == (400, 640, 3)
    # PNG has no draft: full size
    q = tmp_path / "big.png"
    Image.fromarray(_rgb(400, 640)).save(q)
    arr, hw = read_image_with_size(q, target_size=150)
    assert arr.shape == (400, 640, 3) and hw == (400, 640)


def test_draft_with_exif_rotation(tmp_path: Path) -> None:
    p = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(_rgb(400, 640)).save(p, exif=exif)
    arr, hw = read_image_with_size(p, target_size=150)
    assert hw == (640, 400)
    assert arr.shape == (160, 100, 3)


# ---------------------------------------------------------------------- fast JPEG path


def _noisy(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Texture with high frequencies, so any decoder difference would show in the pixels."""
    rng = np.random.default_rng(seed)
    return np.clip(_rgb(h, w).astype(int) + rng.integers(-60, 60, (h, w, 3)), 0, 255).astype(np.uint8)


def _spy_fast_decoder(monkeypatch: pytest.MonkeyPatch) -> list:
    """What the fast JPEG decoder returns for each file (None: it left the file to Pillow)."""
    import ssod_deploy.images as images

    real, returned = images._decode_plain_jpeg, []
    monkeypatch.setattr(images, "_decode_plain_jpeg", lambda *a: returned.append(real(*a)) or returned[-1])
    return returned


@pytest.mark.parametrize("gray", [False, True])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_fast_jpeg_path_equals_pillow_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           orientation: int, gray: bool) -> None:
    import ssod_deploy.images as images

    p = tmp_path / "o.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    im = Image.fromarray(_noisy(200, 328))
    (im.convert("L") if gray else im).save(p, exif=exif, quality=85)
    fast = [read_image_with_size(p, target_size=t) for t in (None, 160, 90, 82, 40)]
    monkeypatch.setattr(images, "_decode_plain_jpeg", lambda *a: None)  # Pillow only
    slow = [read_image_with_size(p, target_size=t) for t in (None, 160, 90, 82, 40)]
    # target 160 / 90 / 82 / 40 on a 328x200 image: draft scales 2, 2 (a 1/4 image would be < 90 wide), 4, 8
    assert [a.shape[:2] for a, _ in fast] == [a.shape[:2] for a, _ in slow]
    assert len({a.shape for a, _ in fast}) == 4
    for (a, hw_a), (b, hw_b) in zip(fast, slow):
        assert hw_a == hw_b
        _check_rgb(a, a.shape[:2])
        assert np.array_equal(a, b)  # bit-identical pixels, orientation included


@pytest.mark.parametrize("save_kw", [
    {"progressive": True}, {"subsampling": 0}, {"subsampling": 1}, {"optimize": True, "quality": 60},
])
def test_fast_jpeg_path_equals_pillow_for_encoder_variants(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           save_kw: dict) -> None:
    """Progressive scans, 4:4:4 / 4:2:2 chroma, optimised tables, odd sides: the fast decoder
    takes the file (no fallback) and still gives Pillow's pixels at every draft scale."""
    import ssod_deploy.images as images

    p = tmp_path / "v.jpg"
    Image.fromarray(_noisy(203, 331, seed=4)).save(p, **save_kw)
    taken = _spy_fast_decoder(monkeypatch)
    targets = (None, 160, 80, 38)  # draft scales 1, 2, 4, 8 on a 331 x 203 image
    fast = [read_image_with_size(p, target_size=t) for t in targets]
    assert all(a is not None for a in taken) and len(taken) == len(targets)
    monkeypatch.setattr(images, "_decode_plain_jpeg", lambda *a: None)  # Pillow only
    slow = [read_image_with_size(p, target_size=t) for t in targets]
    assert len({a.shape for a, _ in fast}) == len(targets)
    for (a, hw_a), (b, hw_b) in zip(fast, slow):
        assert hw_a == hw_b == (203, 331) and np.array_equal(a, b)


def test_corrupt_jpeg_with_end_marker_is_left_to_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Garbage inside a file that still ends with the end marker: libjpeg only warns, the fast
    decoder refuses it and Pillow's reading (the reference behaviour) decides."""
    import ssod_deploy.images as images

    buf = BytesIO()
    Image.fromarray(_noisy(120, 160, seed=2)).save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    data[len(data) // 2 : len(data) // 2 + 400] = b"\xaa" * 400
    p = tmp_path / "corrupt.jpg"
    p.write_bytes(bytes(data))
    taken = _spy_fast_decoder(monkeypatch)
    got = read_image(p)
    assert taken == [None]
    monkeypatch.setattr(images, "_decode_plain_jpeg", lambda *a: None)
    assert np.array_equal(got, read_image(p))


def test_jpeg_without_end_marker_goes_to_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trailing bytes after the image (some cameras append data) are fine; a cut-off file
    still raises (libjpeg alone would pad it with gray and only warn)."""
    good = tmp_path / "tail.jpg"
    Image.fromarray(_noisy(64, 96)).save(good, quality=90)
    ref = read_image(good)
    good.write_bytes(good.read_bytes() + b"camera-trailer")
    calls = _spy_fast_decoder(monkeypatch)
    assert np.array_equal(read_image(good), ref)
    assert calls == [None]  # decided by Pillow
    cut = tmp_path / "cut.jpg"
    data = (tmp_path / "tail.jpg").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    _expect_error(cut, "truncated or corrupt image data")


# ------------------------------------------------------------------------------- discovery


def _touch_image(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")  # discovery never decodes
    return p


def test_discover_sorted_case_insensitive_recursive(tmp_path: Path) -> None:
    for rel in ["b.JPG", "a.png", "sub/c.jpeg", "sub/deeper/d.TiFF", "a2.webp", "z.bmp",
                "notes.txt", "x.gif", ".hidden/h.jpg", "._a.jpg", "sub/e.tif"]:
        _touch_image(tmp_path / rel)
    got = [p.relative_to(tmp_path).as_posix() for p in discover_images(tmp_path)]
    assert got == ["a.png", "a2.webp", "b.JPG", "sub/c.jpeg", "sub/deeper/d.TiFF", "sub/e.tif",
                   "z.bmp"]
    flat = [p.name for p in discover_images(str(tmp_path), recursive=False)]
    assert flat == ["a.png", "a2.webp", "b.JPG", "z.bmp"]
    assert {".jpg", ".png", ".webp", ".tiff"} <= IMAGE_EXTENSIONS


def test_heic_photos_are_found_and_read_upright(tmp_path: Path) -> None:
    """An iPhone-style HEIC with EXIF orientation 6: found, decoded upright once (libheif applies the
    rotation and resets the tag), the header size agrees with the pixels."""
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()  # to write the file; reading registers it by itself
    a = np.zeros((48, 64, 3), np.uint8)
    a[:10, :20] = 255  # a bright block in the stored top-left corner
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    im.save(tmp_path / "IMG_0001.HEIC", exif=exif.tobytes(), quality=95)
    (found,) = discover_images(tmp_path)
    img = read_image(found)
    assert img.shape == (64, 48, 3) and read_image_size(found) == (64, 48)
    bright = np.argwhere(img[..., 0] > 128)
    assert bright.min(0).tolist()[1] >= 38 and bright.max(0).tolist()[0] <= 19  # now top-right, as a viewer shows


def test_heic_without_pillow_heif_is_reported_not_silently_dropped(tmp_path: Path, monkeypatch, caplog) -> None:
    import ssod_deploy.images as images

    monkeypatch.setattr(images, "HEIF_READABLE", False)
    monkeypatch.setattr(images, "IMAGE_EXTENSIONS", images.IMAGE_EXTENSIONS - images.HEIF_EXTENSIONS)
    _touch_image(tmp_path / "a.jpg")
    _touch_image(tmp_path / "sub" / "b.heic")
    _touch_image(tmp_path / "sub" / "c.HEIF")
    with caplog.at_level(logging.WARNING, logger="ssod"):
        assert [p.name for p in images.discover_images(tmp_path)] == ["a.jpg"]
    assert "2 HEIC/HEIF images left out" in caplog.text and "pillow-heif" in caplog.text


def test_mpo_camera_pictures_are_found_and_read_as_their_first_frame(tmp_path: Path) -> None:
    """Multi-picture JPEGs (.mpo, stereo and some phone cameras; ultralytics lists them) are images."""
    ramp = np.linspace(30, 220, 60, dtype=np.float32)  # smooth: JPEG keeps it within a few levels
    first = np.broadcast_to(ramp[None, :, None], (40, 60, 3)).astype(np.uint8)
    Image.fromarray(first).save(tmp_path / "cam.MPO", format="MPO", save_all=True,
                                append_images=[Image.fromarray(255 - first)])
    (found,) = discover_images(tmp_path)
    img = read_image(found)
    assert found.name == "cam.MPO" and img.shape == (40, 60, 3) and read_image_size(found) == (40, 60)
    assert np.abs(img.astype(int) - first).mean() < 4  # the first frame, not the second (its negative)


def test_discover_follows_symlinks_without_cycles(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _touch_image(root / "real" / "a.jpg")
    (root / "real" / "loop").symlink_to(root, target_is_directory=True)  # cycle
    outside = tmp_path / "outside"
    _touch_image(outside / "o.png")
    (root / "link").symlink_to(outside, target_is_directory=True)
    got = [p.relative_to(root).as_posix() for p in discover_images(root)]
    assert got == ["link/o.png", "real/a.jpg"]


def test_discover_txt_list_and_multiple_roots(tmp_path: Path) -> None:
    a = _touch_image(tmp_path / "imgs" / "a.jpg")
    b = _touch_image(tmp_path / "imgs" / "b.jpg")
    c = _touch_image(tmp_path / "other" / "c.png")
    lst = tmp_path / "lists" / "val.txt"
    lst.parent.mkdir()
    lst.write_text(f"# validation images\n../imgs/b.jpg\n\n  {a}  \n../imgs/b.jpg\n")
    assert discover_images(lst) == [tmp_path / "lists" / "../imgs/b.jpg", a]
    got = discover_images([tmp_path / "other", lst, c])
    assert got == [c, tmp_path / "lists" / "../imgs/b.jpg", a]
    with pytest.raises(FileNotFoundError, match="no-such"):
        discover_images(tmp_path / "no-such")
    assert b.exists()


# ----------------------------------------------------------------------------- skip report


def test_skip_report(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    rep = SkipReport()
    assert len(rep) == 0 and rep.items == []
    with caplog.at_level(logging.WARNING, logger="ssod"):
        assert rep.add("a.jpg", "truncated or corrupt image data")
        assert not rep.add("a.jpg", "again")
        rep.add_error(ImageReadError("b.jpg", "empty file (0 bytes)"))
    assert len(caplog.records) == 2
    assert "a.jpg" in caplog.records[0].getMessage()
    assert rep.items == [("a.jpg", "truncated or corrupt image data"), ("b.jpg", "empty file (0 bytes)")]
    assert len(rep) == 2
    assert rep.summary_line().startswith("skipped 2 unreadable images")
    log = rep.save(tmp_path / "skipped.tsv")
    assert Path(log).read_text().splitlines()[1] == "b.jpg\tempty file (0 bytes)"
    assert rep.summary_line() == f"skipped 2 unreadable images (see {log})"
