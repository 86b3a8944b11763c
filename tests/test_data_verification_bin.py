"""faceens.data.verification_bin: InsightFace .bin pair files, read without unpickling code."""

import os
import pickle

import numpy as np
import pytest

from faceens.data import verification_bin
from faceens.data.image_folder import DataError
from tests.builders import jpeg_bytes, orl_face, REPO


SMALL_LFW = os.path.join(REPO, "..", "shared", "data", "insightface_small_lfw", "small_lfw.bin")


@pytest.mark.skipif(not os.path.exists(SMALL_LFW), reason="shared InsightFace fixture not present")
def test_small_lfw_bin_loads():
  images, issame = verification_bin.load_bin(SMALL_LFW)
  assert len(images) == 20 and issame.shape == (10,) and issame.all()
  assert all(b[:2] == b"\xff\xd8" for b in images)  # JPEG
  decoded = verification_bin.decode_images(images, 112, source=SMALL_LFW)
  assert decoded.shape == (20, 112, 112, 3) and 50 < decoded.mean() < 200


def test_bin_round_trip_and_python2_style_pickle(tmp_path):
  imgs = [jpeg_bytes(orl_face("s1", i)) for i in (1, 2, 3, 4)]
  p = str(tmp_path / "x.bin")
  verification_bin.save_bin(p, imgs, [True, False])
  got, issame = verification_bin.load_bin(p)
  assert got == imgs and issame.tolist() == [True, False]
  # InsightFace-era files: uint8 arrays of the bytes, protocol 2 (numpy reconstructors).
  p2 = str(tmp_path / "y.bin")
  with open(p2, "wb") as f:
    pickle.dump(([np.frombuffer(b, np.uint8).reshape(-1, 1) for b in imgs], [1, 0]), f, protocol=2)
  got, issame = verification_bin.load_bin(p2)
  assert got == imgs and issame.tolist() == [True, False]


class _Evil:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.system, (f"touch {self.path}",))


def test_malicious_bin_executes_nothing(tmp_path):
  marker = tmp_path / "pwned"
  p = str(tmp_path / "evil.bin")
  with open(p, "wb") as f:
    pickle.dump(([_Evil(str(marker))], [True]), f)
  with pytest.raises(DataError, match=r"refusing to load: the pickle references (posix|os|nt)\.system"):
    verification_bin.load_bin(p)
  assert not marker.exists()
  with open(p, "wb") as f:
    f.write(b"\x80\x04garbage")
  with pytest.raises(DataError, match="evil.bin is not a readable verification .bin"):
    verification_bin.load_bin(p)
  with open(p, "wb") as f:
    pickle.dump(([b"a", b"b", b"c"], [True]), f)
  with pytest.raises(DataError, match="3 images but 1 pairs"):
    verification_bin.load_bin(p)
