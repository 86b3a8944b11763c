"""faceens.api: loading a run and embedding images of every kind."""

import numpy as np
from PIL import Image
import pytest

import faceens
from faceens import verification
from faceens.data.image_folder import fit_image
from tests.builders import orl_face
from tests.references import float32_rounding


@pytest.fixture(scope="module")
def model(run_dir):
  return faceens.load(run_dir)


def test_load_and_embed_inputs(model):
  s = model.input_size
  assert (model.num_members, model.embedding_dim, model.step) == (3, 16, 3)
  raw = np.stack([orl_face("s31", 1), orl_face("s32", 1)])          # uint8 [2, 112, 92], grayscale
  fitted = np.stack([fit_image(Image.fromarray(x), s, model.config.data.fit) for x in raw])
  e_raw = model.embed(raw)
  np.testing.assert_allclose(e_raw, model.embed(fitted), atol=1e-6)
  np.testing.assert_allclose(e_raw, model.embed(fitted.astype(np.float32) / 255), atol=1e-6)
  np.testing.assert_allclose(e_raw, model.embed(raw[..., None].repeat(3, -1)), atol=1e-6)
  # The ensemble embedding is the mean of the normalised member features (not renormalised).
  members = np.stack([model.embed(raw, member=k) for k in range(3)])
  np.testing.assert_allclose(np.linalg.norm(members, axis=-1), 1.0, rtol=1e-5)
  # Different compiled programs (the stack of 3 against each member alone) round differently: up
  # to ~eps * sqrt(fan-in) per layer (random-walk rounding; the largest fan-in is the fc's 512),
  # over ~20 layers, on unit-norm features.
  net_atol = float32_rounding(20, 512)
  np.testing.assert_allclose(e_raw, members.mean(0), atol=net_atol)
  assert not np.allclose(members[0], members[1], atol=1e-3)
  # member=k is member k's network alone: compare with the full stack's k-th output.
  np.testing.assert_allclose(model.member_features(raw)[1], members[1], atol=net_atol)
  # flip=True: normalise(E(x) + E(mirror x)).
  mirrored = fitted[:, :, ::-1]
  expected = verification.flip_embedding(e_raw, model.embed(mirrored))
  np.testing.assert_allclose(model.embed(raw, flip=True), expected, atol=1e-5)
  assert not np.allclose(model.embed(raw, flip=True), e_raw / np.linalg.norm(e_raw, axis=1,
                                                                          keepdims=True), atol=1e-3)


def test_embed_rejects_bad_arrays(model):
  with pytest.raises(ValueError, match="input size 32x32"):
    model.embed(np.zeros((1, 40, 40, 3), np.float32))
  with pytest.raises(ValueError, match=r"in \[0, 1\]"):
    model.embed(np.full((1, 32, 32, 3), 2.0, np.float32))
  with pytest.raises(ValueError, match="member must be None"):
    model.embed(np.zeros((1, 32, 32, 3), np.uint8), member=3)
  with pytest.raises(ValueError, match=r"\[B, H, W\] or \[B, H, W, 3\]"):
    model.embed(np.zeros((32, 32), np.uint8))


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    faceens.load(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="not a faceens run directory"):
    faceens.load(str(tmp_path))


def test_verify_takes_paths_and_arrays_alike(model):
  import os
  from tests.builders import ORL
  pa, pb = os.path.join(ORL, "s31", "1.pgm"), os.path.join(ORL, "s32", "1.pgm")
  by_path = faceens.verify(model, pa, pb, threshold=1.0)
  arrays = faceens.verify(model, orl_face("s31", 1), orl_face("s32", 1), threshold=1.0)
  assert by_path["distance"] == pytest.approx(arrays["distance"], abs=1e-6)
  assert (arrays["image_a"], by_path["image_a"]) == ("array", pa)
  # The distance is InsightFace's: squared L2 of the flip-augmented embeddings.
  e = model.embed(np.stack([orl_face("s31", 1), orl_face("s32", 1)]), flip=True)
  assert arrays["distance"] == pytest.approx(float(np.sum((e[0] - e[1]) ** 2)), abs=1e-5)
  assert arrays["same"] == (arrays["distance"] < 1.0) and arrays["threshold_source"] == "given"
  default = faceens.verify(model, pa, pb)
  assert default["threshold"] == model.threshold and default["threshold_source"].startswith(
      "eval.json:heldout")
  assert {"load", "FaceModel", "verify"} <= set(dir(faceens))
