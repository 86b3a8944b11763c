"""Input-pipeline throughput: decoded, augmented 112x112 images/s from a packed ``.rec``.

  python bench/input_pipeline.py --out bench/results/input_pipeline.json

Packs the bundled ORL faces (400 images, JPEG q95 at 112x112) with ``faceens.data.pack_rec``,
then measures, on the same machine in the same run:

  * ``plain_pil``: a plain Python loop (read the record, PIL decode, random flip, normalise to
    float32), the baseline most PyTorch/mxnet face loaders amount to per worker;
  * ``grain``: ``faceens.data.pipeline.build`` (shuffle, decode, batch 64): first with the PIL
    loop's work (flip, normalise) in-process, then with the training augmentation (flip +
    translation + contrast/brightness) in-process (``workers=0``) and with 1, 2, ... worker
    processes.

Images/s per worker process is what sizes the CPU side of a GPU host. Writes JSON; prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plain_pil(rec_path: str, n: int) -> float:
  import io

  from PIL import Image

  from faceens.data import recordio
  ds = recordio.RecordIODataset(rec_path)
  rng = np.random.default_rng(0)
  order = rng.integers(0, len(ds), n)
  t = time.perf_counter()
  for i in order:
    img, _ = ds[int(i)]
    x = np.asarray(Image.open(io.BytesIO(img)).convert("RGB"))
    if rng.random() < 0.5:
      x = x[:, ::-1]
    x = (x.astype(np.float32) / 255.0 - 0.5) / 0.5
  return n / (time.perf_counter() - t)


def grain_rate(rec_path: str, n: int, workers: int, batch: int = 64, full: bool = True) -> float:
  from faceens.data import pipeline
  src = pipeline.RecordIOSource(rec_path)
  aug = dict(max_shift=8, contrast=0.2, brightness=20) if full else {}
  ds = pipeline.build(src, global_batch=batch, image_size=112, seed=0, flip=True, **aug,
                      process_index=0, process_count=1, normalize=not full,
                      workers=workers, read_threads=1 if workers == 0 else 2, prefetch=4)
  it = iter(ds)
  for _ in range(max(2, workers * 2)):  # start-up: processes, first batches
    next(it)
  steps = max(1, n // batch)
  t = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch / (time.perf_counter() - t)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=2048, help="images timed per configuration")
  p.add_argument("--workers", default="0,1,2")
  p.add_argument("--out", default="bench/results/input_pipeline.json")
  a = p.parse_args()
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  from faceens.data import demo, pack_rec
  tmp = tempfile.mkdtemp(prefix="faceens-bench-")
  pack_rec.pack_folder(demo.orl_root(), tmp, size=112, progress=False)
  rec = os.path.join(tmp, "train.rec")
  out = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "images": a.images,
         "rec_bytes": os.path.getsize(rec), "image_size": 112}
  out["plain_pil_img_per_s"] = plain_pil(rec, a.images)
  print(f"plain PIL loop (1 process): {out['plain_pil_img_per_s']:.0f} img/s", flush=True)
  r = grain_rate(rec, a.images, 0, full=False)
  out["grain_flip_normalize_img_per_s"] = r
  print(f"grain, same work as the PIL loop (flip + normalise), in-process: {r:.0f} img/s",
        flush=True)
  out["grain"] = []
  for w in [int(x) for x in a.workers.split(",")]:
    r = grain_rate(rec, a.images, w)
    per = r / max(w, 1)
    out["grain"].append({"workers": w, "img_per_s": r, "img_per_s_per_process": per})
    print(f"grain + translation + photometric, workers={w}: {r:.0f} img/s ({per:.0f} per "
          "process)", flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
