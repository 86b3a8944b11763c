"""What the tests build and share: LFW-layout folders, RecordIO files written without faceens,
faces for attacks, experiment files, paths."""

import glob
import importlib.util
import io
import os
import struct

import numpy as np
from PIL import Image

from faceens import attack as attack_cli
from faceens.data import demo


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_LFW = os.path.join(REPO, "..", "shared", "data", "lfw")


PEOPLE = {"Ann_A": 3, "Bob_B": 2, "Cy_C": 2, "Di_D": 1, "Ed_E": 2}


# Header "2 2": 2 folds, each 2 same-person lines then 2 different-person lines.
PAIRS = """2\t2
Ann_A\t1\t2
Bob_B\t1\t2
Ann_A\t1\tCy_C\t1
Bob_B\t2\tDi_D\t1
Cy_C\t1\t2
Ed_E\t1\t2
Cy_C\t2\tEd_E\t1
Ann_A\t3\tEd_E\t2
"""


def make_lfw(root, people=PEOPLE, pairs=PAIRS, images_subdir=True):
  """A tiny LFW-layout folder of real faces (bundled ORL people s1..s5), 250x250 grayscale JPEG."""
  base = os.path.join(root, "images") if images_subdir else str(root)
  for p, (name, n) in enumerate(people.items()):
    os.makedirs(os.path.join(base, name))
    for i in range(1, n + 1):
      with Image.open(os.path.join(demo.orl_root(), f"s{p + 1}", f"{i}.pgm")) as im:
        im.resize((250, 250)).save(os.path.join(base, name, f"{name}_{i:04d}.jpg"))
  with open(os.path.join(root, "pairs.txt"), "w") as f:
    f.write(pairs)
  return str(root)


ORL = demo.orl_root()


MAGIC = 0xCED7230A


def independent_rec(path, records):
  """A .rec / .idx written straight from the format description (no multi-part records)."""
  offsets = []
  with open(path, "wb") as f:
    for payload in records:
      offsets.append(f.tell())
      f.write(struct.pack("<II", MAGIC, len(payload)))  # cflag 0
      f.write(payload + b"\0" * (-len(payload) % 4))
  with open(path[:-4] + ".idx", "w") as f:
    f.writelines(f"{k}\t{o}\n" for k, o in enumerate(offsets))


def irheader(flag, label, id_=0, id2=0):
  return struct.pack("<IfQQ", flag, label, id_, id2)


def random_jpeg(seed, size=24):
  arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG")
  return buf.getvalue()


def attack_faces(model, n=8, seed=0):
  from faceens.data import demo, image_folder
  faces = image_folder.load_image_folder(demo.orl_root(), model.input_size, "pad",
                                         demo.HELDOUT_IDENTITIES)
  pairs = attack_cli.make_pairs(faces.labels, n, seed)
  x = model.prepare(faces.images)
  return x[pairs[:, 0]], x[pairs[:, 1]]


EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, "faceens", "experiments", "*.py")))


def load_experiment(path, variant):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


# Four folds of one same- and one different-person pair: folds 1-2 (Ann..Dan) and the people in
# no pair (Eve, Fay; Gus has one image) train, folds 3-4 (Hal..Kim) test.
PEOPLE4 = {"Ann": 2, "Bob": 2, "Cat": 3, "Dan": 2, "Eve": 2, "Fay": 3, "Gus": 1, "Hal": 2,
           "Ida": 1, "Jon": 2, "Kim": 1}
PAIRS4 = """4 1
Ann 1 2
Ann 1 Bob 1
Cat 1 3
Cat 2 Dan 1
Hal 1 2
Hal 2 Ida 1
Jon 1 2
Jon 1 Kim 1
"""


def jpeg_bytes(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).convert("RGB").save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def orl_face(identity, i):
  """One bundled ORL face as uint8 [112, 92]."""
  with Image.open(os.path.join(ORL, identity, f"{i}.pgm")) as im:
    return np.asarray(im)


TINY = dict(width=0.125, blocks=(1, 1, 1, 1), embedding_dim=16)


def jpeg_folder(tmp_path, n_ids=3, per=4):
  """``tmp_path/faces/id<k>/<j>.jpg``: ``n_ids`` identities of ``per`` random 32x32 JPEGs."""
  root = tmp_path / "faces"
  for k in range(n_ids):
    d = root / f"id{k}"
    d.mkdir(parents=True)
    for j in range(per):
      (d / f"{j}.jpg").write_bytes(random_jpeg(100 * k + j, 32))
  return root
