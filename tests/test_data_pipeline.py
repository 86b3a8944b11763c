"""faceens.data.pipeline and sampler: determinism, host shards, resume, workers, augmentation."""

import numpy as np
import pytest

from faceens.data import pipeline
from faceens.data.image_folder import DataError
from tests.builders import random_jpeg


def test_corrupt_jpeg_in_the_pipeline(tmp_path):
  good = [(random_jpeg(i), i % 2, f"img{i}") for i in range(6)]
  bad = good[:3] + [(b"\xff\xd8\xff garbage", 1, "img3-corrupt")] + good[4:]
  kw = dict(global_batch=2, image_size=16, process_index=0, process_count=1, read_threads=1)
  with pytest.raises(DataError, match="img3-corrupt: cannot decode image"):
    it = iter(pipeline.build(bad, **kw))
    for _ in range(6):
      next(it)
  it = iter(pipeline.build(bad, skip_bad=True, **kw))
  seen = [next(it) for _ in range(10)]
  assert all(x.shape == (2, 16, 16, 3) for x, _ in seen)


def _array_source(n=12):
  images = np.stack([np.full((8, 8, 3), i, np.uint8) for i in range(n)])
  return pipeline.ArraySource(images, np.arange(n))


def _take(ds, k):
  it = iter(ds)
  return [next(it) for _ in range(k)]


def test_pipeline_epochs_determinism_and_host_shards():
  src = _array_source(12)
  kw = dict(global_batch=4, image_size=8, flip=False, process_index=0, process_count=1,
            read_threads=1)
  a = _take(pipeline.build(src, seed=1, **kw), 6)           # 24 examples = two epochs
  b = _take(pipeline.build(src, seed=1, **kw), 6)
  c = _take(pipeline.build(src, seed=2, **kw), 6)
  labels = np.concatenate([y for _, y in a])
  assert sorted(labels[:12]) == list(range(12)) and sorted(labels[12:]) == list(range(12))
  assert not np.array_equal(labels[:12], labels[12:])       # reshuffled each epoch
  for (xa, ya), (xb, yb) in zip(a, b):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  assert not all(np.array_equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))
  for x, y in a:  # the image is the one of the label (constant value = index)
    np.testing.assert_array_equal(x[:, 0, 0, 0], y)


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_together_read_the_one_host_global_batches(hosts):
  """Host p's batch is rows p*b..(p+1)*b-1 of the one-host global batch, augmentation included,
  across epoch boundaries (12 examples, batch 8: batches straddle epochs)."""
  src = _array_source(12)
  src.images = np.stack([np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3) + i for i in range(12)])
  kw = dict(seed=5, global_batch=8, image_size=8, flip=True, max_shift=2, contrast=0.3,
            brightness=20, read_threads=1)
  one = _take(pipeline.build(src, process_index=0, process_count=1, **kw), 5)
  parts = [_take(pipeline.build(src, process_index=p, process_count=hosts, **kw), 5)
           for p in range(hosts)]
  for t, (x, y) in enumerate(one):
    assert all(part[t][0].shape == (8 // hosts, 8, 8, 3) for part in parts)
    np.testing.assert_array_equal(np.concatenate([part[t][0] for part in parts]), x)
    np.testing.assert_array_equal(np.concatenate([part[t][1] for part in parts]), y)
  labels = np.concatenate([y for _, y in one])
  assert sorted(labels[:12]) == list(range(12))             # one epoch = every example once
  with pytest.raises(ValueError, match="not divisible by 3 hosts"):
    pipeline.build(src, process_index=0, process_count=3, **kw)


def test_pipeline_resume_from_iterator_state_and_flip():
  src = _array_source(12)
  src.images = np.stack([np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3) + i for i in range(12)])
  ds = pipeline.build(src, seed=3, global_batch=4, image_size=8, flip=True, max_shift=1,
                      contrast=0.2, brightness=10, process_index=0, process_count=1,
                      read_threads=2)
  it = iter(ds)
  for _ in range(2):
    next(it)
  state = it.get_state()
  cont = [next(it) for _ in range(3)]
  it2 = iter(ds)
  it2.set_state(state)
  for (x1, y1), (x2, y2) in zip(cont, [next(it2) for _ in range(3)]):
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
  # Flip only (no shift/photometric): each output is the source image or its mirror, both occur.
  ds = pipeline.build(src, seed=3, global_batch=4, image_size=8, flip=True, process_index=0,
                      process_count=1, read_threads=1)
  flips = []
  for x, y in _take(ds, 6):
    for xi, yi in zip(x, y):
      orig = src.images[yi]
      assert np.array_equal(xi, orig) or np.array_equal(xi, orig[:, ::-1])
      flips.append(not np.array_equal(xi, orig))
  assert 0 < sum(flips) < len(flips)


def test_pipeline_worker_processes_are_deterministic_and_resumable(small_rec):
  # Worker w builds the batches of its own slice, so the order depends on the worker count
  # (a run resumes with the count it was started with), but not on timing.
  path, _, _ = small_rec
  src = pipeline.RecordIOSource(path)
  ds = pipeline.build(src, seed=0, global_batch=2, image_size=16, process_index=0,
                      process_count=1, workers=2)
  a, b = _take(ds, 4), _take(ds, 4)
  it = iter(ds)
  next(it)
  state = it.get_state()
  rest = [next(it) for _ in range(3)]
  it2 = iter(ds)
  it2.set_state(state)
  for (x1, y1), (x2, y2), (x3, y3) in zip(a[1:], b[1:], [next(it2) for _ in range(3)]):
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(x1, x3)
    np.testing.assert_array_equal(y1, y3)
  for (x1, _), (x2, _) in zip(a[1:], rest):
    np.testing.assert_array_equal(x1, x2)


def test_translate_and_photometric_by_hand():
  from faceens.data.sampler import adjust, translate
  x = np.arange(1, 10, dtype=np.uint8).reshape(1, 3, 3, 1)
  np.testing.assert_array_equal(translate(x, np.array([[1, -1]]))[0, :, :, 0],
                                [[0, 0, 0], [2, 3, 0], [5, 6, 0]])
  np.testing.assert_array_equal(translate(x, np.array([[0, 0]])), x)
  # mean 5: (x - 5) * 2 + 5 + 10, clipped to [0, 255].
  np.testing.assert_array_equal(adjust(x, np.array([2.0]), np.array([10.0]))[0, :, :, 0],
                                [[7, 9, 11], [13, 15, 17], [19, 21, 23]])
