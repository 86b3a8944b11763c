"""faceens.data.image_folder and demo: formats, fitting, crop boxes, bad files, bundled ORL."""

import os

import numpy as np
from PIL import Image
import pytest

from faceens.data import demo, image_folder, pipeline
from faceens.data.image_folder import DataError
from tests.builders import jpeg_folder


def _folder(tmp_path):
  rng = np.random.default_rng(0)
  for ident, ext in (("alice", "png"), ("bob", "jpg"), ("carol", "pgm")):
    os.makedirs(tmp_path / ident)
    for i in range(2):
      arr = rng.integers(0, 255, size=(40, 30) if ext == "pgm" else (40, 30, 3), dtype=np.uint8)
      Image.fromarray(arr).save(tmp_path / ident / f"{i}.{ext}")
  return str(tmp_path)


def test_image_folder_loads_every_format(tmp_path):
  fs = image_folder.load_image_folder(_folder(tmp_path), 32)
  assert fs.classes == ["alice", "bob", "carol"]
  assert fs.images.shape == (6, 32, 32, 3) and fs.images.dtype == np.uint8
  np.testing.assert_array_equal(fs.labels, [0, 0, 1, 1, 2, 2])
  gray = fs.images[4]  # a PGM: grayscale repeated on 3 channels
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


def test_fit_pad_keeps_aspect_and_zero_pads():
  img = Image.fromarray(np.full((112, 92), 200, np.uint8))  # ORL geometry (W 92, H 112)
  out = image_folder.fit_image(img, 32, "pad")
  # Longer side 112 -> 32, width round(92 * 32 / 112) = 26, padded 3 columns each side.
  assert out.shape == (32, 32, 3)
  np.testing.assert_array_equal(out[:, :3], 0)
  np.testing.assert_array_equal(out[:, 29:], 0)
  np.testing.assert_array_equal(out[:, 3:29], 200)
  assert image_folder.fit_image(img, 32, "crop").min() == 200


def test_crop_box_cuts_before_fitting():
  rng = np.random.default_rng(3)
  arr = rng.integers(0, 256, (250, 250), dtype=np.uint8)
  img = Image.fromarray(arr)
  out = image_folder.fit_image(img, 32, "stretch@70,60,110,100")
  # Reference: the numpy slice [top:top+h, left:left+w], then the same resize.
  want = np.asarray(Image.fromarray(arr[70:180, 60:160]).convert("RGB").resize((32, 32),
                                                                                Image.BILINEAR))
  np.testing.assert_array_equal(out, want)
  # A box of the image's own size changes nothing.
  np.testing.assert_array_equal(image_folder.fit_image(img, 32, "pad@0,0,250,250"),
                                image_folder.fit_image(img, 32, "pad"))
  with pytest.raises(ValueError, match="does not fit in a 250x250 image"):
    image_folder.fit_image(img, 32, "pad@200,0,110,110")
  with pytest.raises(ValueError, match="must be 4 integers"):
    image_folder.fit_image(img, 32, "pad@1,2,3")
  with pytest.raises(ValueError, match="unknown fit 'padd'"):
    image_folder.fit_image(img, 32, "padd")


def test_crop_in_config_reaches_the_loaders(tmp_path):
  from faceens import configs
  c = configs.experiment("arcface_srv_fdp", "test")
  assert image_folder.fit_spec(c) == "pad"
  c.data.crop = (10, 5, 20, 20)
  configs.validate(c)
  assert image_folder.fit_spec(c) == "pad@10,5,20,20"
  root = _folder(tmp_path)  # 30 wide, 40 high
  fs = image_folder.load_image_folder(root, 16, image_folder.fit_spec(c))
  with Image.open(os.path.join(root, "alice", "0.png")) as im:
    want = image_folder.fit_image(im.crop((5, 10, 25, 30)), 16, "pad")  # PIL: left, top, right, bottom
  np.testing.assert_array_equal(fs.images[0], want)
  with pytest.raises(DataError, match=r"alice.0\.png: crop box .* does not fit in a 30x40 image"):
    image_folder.load_image(os.path.join(root, "alice", "0.png"), 16, "pad@10,5,80,70")
  c.data.crop = (1, 2, 3)
  with pytest.raises(ValueError, match=r"data.crop = \(1, 2, 3\) is invalid"):
    configs.validate(c)


def test_bad_inputs_name_the_file(tmp_path):
  root = _folder(tmp_path)
  (tmp_path / "bob" / "notes.txt").write_text("not a face")
  with pytest.raises(DataError, match=r"notes\.txt is not an image file"):
    image_folder.load_image_folder(root, 32)
  os.remove(tmp_path / "bob" / "notes.txt")
  (tmp_path / "bob" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
  with pytest.raises(DataError, match=r"cannot decode image .*broken\.jpg"):
    image_folder.load_image_folder(root, 32)
  fs = image_folder.load_image_folder(root, 32, skip_bad=True)
  assert len(fs) == 6
  with pytest.raises(DataError, match="does not exist"):
    image_folder.load_image_folder(str(tmp_path / "nope"), 32)
  os.makedirs(tmp_path / "empty")
  with pytest.raises(DataError, match="no identity sub-folders with images"):
    image_folder.load_image_folder(str(tmp_path / "empty"), 32)


def test_bundled_orl_faces():
  root = demo.orl_root()
  assert os.path.exists(os.path.join(root, "README"))  # the dataset's credit travels with it
  fs = image_folder.load_image_folder(root, 32, identities=demo.HELDOUT_IDENTITIES)
  assert fs.images.shape == (100, 32, 32, 3)
  assert fs.classes[0] == "s31" and fs.classes[-1] == "s40"
  assert not set(demo.TRAIN_IDENTITIES) & set(demo.HELDOUT_IDENTITIES)


def test_empty_folder_and_non_image_file(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="has no identity sub-folders with images"):
    pipeline.ImageFolderSource(str(tmp_path / "empty"))
  root = jpeg_folder(tmp_path, 2, 2)
  (root / "id0" / "notes.txt").write_text("hello")
  with pytest.raises(DataError, match=r"notes.txt is not an image file"):
    pipeline.ImageFolderSource(str(root))
  assert len(pipeline.ImageFolderSource(str(root), skip_bad=True)) == 4
