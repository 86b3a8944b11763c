"""The training input pipeline (grain) over any random-access source.

    source  ->  seeded shuffle, reshuffled every epoch  ->  decode  ->  random flip /
            translation / contrast / brightness  ->  this host's part of each global batch
            ->  batch  ->  worker processes and prefetch

Sources are sequences whose items are ``(encoded bytes or uint8 image, label, where)``, ``where``
naming the file / record for error messages: ``RecordIOSource`` (InsightFace ``train.rec``),
``ImageFolderSource`` (``root/<identity>/<image>``), ``TFDSSource`` (``tfds.data_source``).

Batches are ``(uint8 images [b, S, S, 3], int32 labels [b])`` with ``b`` = global batch / number
of hosts; the model normalises ``(x / 255 - 0.5) / 0.5`` on the device, which moves 4x fewer
bytes than floats (``normalize=True`` does it here instead). Every random choice is a function of
``(seed, epoch, position in the global stream)``, so the pipeline is deterministic, and its
iterator state is saved in the orbax checkpoint: a resumed run sees exactly the batches an
uninterrupted run would. All hosts walk one global order and host ``p`` of ``P`` takes rows
``p * b .. (p + 1) * b - 1`` of every global batch (``HostShard``), reading and decoding only
those: the global batches, augmentation included, are the same for any number of hosts.
With worker processes each worker assembles the batches of its own slice of the stream, so the
order depends on ``workers`` (not on timing): resume a run with the worker count it started with.
"""

from __future__ import annotations

import io
import logging
import os

import grain
import numpy as np

from faceens.data import image_folder, recordio
from faceens.data.image_folder import DataError
from faceens.data.sampler import adjust, translate


# ----------------------------------------------------------------------------- sources


class RecordIOSource:
  """Image records of an InsightFace ``.rec`` as ``(jpeg bytes, label, where)``."""

  def __init__(self, rec_path: str, idx_path: str | None = None):
    self.ds = recordio.RecordIODataset(rec_path, idx_path)
    self.num_classes = self.ds.num_classes

  def __len__(self):
    return len(self.ds)

  def __getitem__(self, i):
    img, label = self.ds[i]
    return img, label, f"{self.ds.rec_path} record {int(self.ds._image_keys[i])}"

  def labels(self) -> np.ndarray:
    return self.ds.labels()


class ImageFolderSource:
  """``root/<identity>/<image>`` read lazily as ``(file bytes, label, path)``."""

  def __init__(self, root: str, identities=None, skip_bad: bool = False):
    names, files, skipped = image_folder.list_image_files(root, identities, skip_bad)
    self.paths = [p for p, _ in files]
    labels = [label for _, label in files]
    if skipped:
      logging.warning("skipped %d non-image files under %s (first: %s)", len(skipped), root,
                      skipped[0])
    self._labels = np.asarray(labels, np.int64)
    self.num_classes = len(names)
    self.classes = names

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    p = self.paths[i]
    with open(p, "rb") as f:
      return f.read(), int(self._labels[i]), p

  def labels(self) -> np.ndarray:
    return self._labels


class TFDSSource:
  """A ``tfds.data_source`` split with ``image`` and ``label`` features."""

  def __init__(self, data_source, name: str = "tfds"):
    self.src, self.name = data_source, name
    self.num_classes = None

  def __len__(self):
    return len(self.src)

  def __getitem__(self, i):
    r = self.src[i]
    return r["image"], int(r["label"]), f"{self.name} example {i}"


class ArraySource:
  """In-memory uint8 images ``[N, H, W, 3]`` and labels."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, name: str = "array"):
    self.images, self._labels, self.name = images, np.asarray(labels, np.int64), name
    self.num_classes = int(self._labels.max()) + 1 if len(self._labels) else 0

  def __len__(self):
    return len(self._labels)

  def __getitem__(self, i):
    return self.images[i], int(self._labels[i]), f"{self.name}[{i}]"

  def labels(self) -> np.ndarray:
    return self._labels


# ----------------------------------------------------------------------------- transforms


class Decode:
  """``(bytes | uint8 array, label, where) -> (uint8 [S, S, 3], label)``; bad images raise
  ``DataError`` naming ``where``, or with ``skip_bad`` become ``None`` (dropped, counted)."""

  def __init__(self, size: int, fit: str = "pad", skip_bad: bool = False):
    self.size, self.fit, self.skip_bad = size, fit, skip_bad
    self.skipped = 0

  def __call__(self, element):
    from PIL import Image, UnidentifiedImageError
    data, label, where = element
    try:
      if isinstance(data, np.ndarray):
        img = data if data.ndim == 3 else data[..., None]
        if img.shape[:2] == (self.size, self.size) and img.shape[2] == 3 and img.dtype == np.uint8:
          return img, np.int32(label)
        img = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
        return image_folder.fit_image(img, self.size, self.fit), np.int32(label)
      with Image.open(io.BytesIO(data)) as img:
        img.load()
        return image_folder.fit_image(img, self.size, self.fit), np.int32(label)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
      if not self.skip_bad:
        raise DataError(f"{where}: cannot decode image: {e} (set data.skip_bad=True to skip "
                        "undecodable images)") from None
      self.skipped += 1
      if self.skipped <= 10 or self.skipped % 1000 == 0:
        logging.warning("skipping undecodable image %s (%d skipped so far in this process)",
                        where, self.skipped)
      return None


class Augment:
  """Random horizontal flip, translation by up to ``max_shift`` pixels (zero fill), contrast
  factor in ``1 +- contrast`` about the image mean and brightness offset in ``+- brightness``."""

  def __init__(self, flip: bool = True, max_shift: int = 0, contrast: float = 0.0,
               brightness: float = 0.0):
    self.flip, self.max_shift = flip, max_shift
    self.contrast, self.brightness = contrast, brightness

  def __call__(self, element, rng: np.random.Generator):
    img, label = element
    u = rng.random(5)  # fixed number of draws: each choice is independent of the others' settings
    x = img[None]
    if self.flip and u[0] < 0.5:
      x = x[:, :, ::-1]
    if self.max_shift > 0:
      s = np.floor(u[1:3] * (2 * self.max_shift + 1)).astype(np.int64) - self.max_shift
      x = translate(x, s[None])
    if self.contrast > 0 or self.brightness > 0:
      factor = 1 - self.contrast + 2 * self.contrast * u[3]
      offset = -self.brightness + 2 * self.brightness * u[4]
      x = adjust(x, np.array([factor]), np.array([offset]))
    return np.ascontiguousarray(x[0]), label


def _normalize(batch):
  images, labels = batch
  return (images.astype(np.float32) / 255.0 - 0.5) / 0.5, labels


# ----------------------------------------------------------------------------- pipeline


class HostShard(grain.MapDataset):
  """Host ``process_index``'s rows of each global batch of ``parent``: local element ``i`` is
  global element ``(i // b) * B + process_index * b + i % b``, with ``b`` the local and ``B`` the
  global batch size."""

  def __init__(self, parent, process_index: int, local_batch: int, global_batch: int):
    super().__init__(parent)
    self._p, self._b, self._g = process_index, local_batch, global_batch

  def __len__(self):
    return len(self._parent) // self._g * self._b

  def global_index(self, i: int) -> int:
    return (i // self._b) * self._g + self._p * self._b + i % self._b

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self.global_index(index)]

  def __str__(self):
    first = self._p * self._b
    return f"HostShard(host {self._p}: rows {first}..{first + self._b - 1} of every {self._g})"


def build(source, *, global_batch: int, image_size: int, seed: int = 0, fit: str = "pad",
          flip: bool = True, max_shift: int = 0, contrast: float = 0.0, brightness: float = 0.0,
          skip_bad: bool = False, process_index: int | None = None,
          process_count: int | None = None, workers: int = 0, read_threads: int = 4,
          prefetch: int = 2, normalize: bool = False):
  """The grain ``IterDataset`` of this host's training batches (infinite; see module docstring)."""
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by {process_count} hosts")
  local_batch = global_batch // process_count
  n = len(source)
  if n == 0:
    raise DataError("the training source is empty")
  if n < global_batch:
    raise ValueError(f"global batch {global_batch} exceeds the {n} training examples")
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
  ds = ds.map(Decode(image_size, fit, skip_bad))
  if skip_bad:
    ds = ds.filter(lambda e: e is not None)
  ds = ds.random_map(Augment(flip, max_shift, contrast, brightness))
  if process_count > 1:
    ds = HostShard(ds, process_index, local_batch, global_batch)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, read_threads),
                                            prefetch_buffer_size=max(local_batch * prefetch, 1)))
  it = it.batch(local_batch, drop_remainder=True)
  if normalize:
    it = it.map(_normalize)
  if workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain reads absl flags; outside an absl app use defaults
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=prefetch))
  return it


def steps_per_epoch(source, global_batch: int) -> int:
  return max(1, len(source) // global_batch)


def worker_count(requested: int) -> int:
  """``-1``: as many worker processes as spare CPU cores (cores - 1, at most 16)."""
  if requested >= 0:
    return requested
  return max(0, min(16, (os.cpu_count() or 1) - 1))
