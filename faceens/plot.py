"""Figures like Amada et al.'s Fig. 2-5 from attack results of several runs.

    python -m faceens.plot --runs=runs/demo_single,runs/demo_baseline,runs/demo --out=figures

* ``tau_<method>.png``: tau-attack success rate (Eq. 1) against tau = ||x_adv - x_s||_2, one line
  per run (Fig. 2 / 3), from ``<run>/attacks/attack_<method>.json``;
* ``transfer_<method>.png``: black-box transfer rate against the feature distance the examples
  were crafted to, one line per target run (Fig. 4), from ``<run>/attacks/transfer_<method>.json``;
* ``perturbation_<method>.png``: mean L2 perturbation of those examples against the distance
  (Fig. 5), one line per source run.
"""

from __future__ import annotations

import glob
import json
import os


def _label(run: str, labels: dict) -> str:
  if run in labels:
    return labels[run]
  path = os.path.join(run, "config.json")
  if os.path.isfile(path):
    with open(path) as f:
      c = json.load(f)
    return f"{c['loss']['name']}_{c['method']} ({os.path.basename(os.path.normpath(run))})"
  return os.path.basename(os.path.normpath(run))


def collect(runs, attacks_subdir: str = "attacks"):
  """``({method: {run: doc}}, {method: {run: doc}})`` of white-box and transfer results."""
  white, transfer = {}, {}
  for run in runs:
    d = os.path.join(run, attacks_subdir)
    if not os.path.isdir(run):
      raise FileNotFoundError(f"run directory {run!r} does not exist")
    for path in sorted(glob.glob(os.path.join(d, "attack_*.json"))):
      name = os.path.basename(path)[len("attack_"):-len(".json")]
      if name == "summary":
        continue
      with open(path) as f:
        white.setdefault(name, {})[run] = json.load(f)
    for path in sorted(glob.glob(os.path.join(d, "transfer_*.json"))):
      name = os.path.basename(path)[len("transfer_"):-len(".json")]
      with open(path) as f:
        transfer.setdefault(name, {})[run] = json.load(f)
  return white, transfer


def save(fig, path: str, ax=None) -> str:
  """Grid and legend on ``ax`` (if given), then ``fig`` written to ``path`` and closed."""
  import matplotlib.pyplot as plt
  if ax is not None:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot(runs, out_dir: str, labels: dict | None = None) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = labels or {}
  white, transfer = collect(runs)
  if not white and not transfer:
    raise FileNotFoundError("no attack_<method>.json or transfer_<method>.json under "
                            + ", ".join(os.path.join(r, "attacks") for r in runs)
                            + "; run python -m faceens.attack first")
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for name, docs in sorted(white.items()):
    fig, ax = plt.subplots(figsize=(5, 4))
    for run, doc in docs.items():
      s = doc["summary"]
      if not doc["tau_curve"]:  # no successful AX: Eq. 1 is undefined
        ax.plot([], [], label=f"{_label(run, labels)}: success 0/{s['n']}")
        continue
      taus, rates = zip(*doc["tau_curve"])
      ax.plot(taus, rates, label=f"{_label(run, labels)}: success {s['success_rate']:.2f}, "
                                 f"L2 med {s['l2_median'] or 0:.2f}")
    goal = next(iter(docs.values()))["summary"].get("goal")
    ax.set(xlabel=r"$\tau$ ($\|x_{adv} - x_s\|_2$, pixels in [0, 1])",
           ylabel=r"$\tau_{Acc}$ (Eq. 1: share of successful AXs)", title=f"LOTS via {name} (goal: {goal})",
           ylim=(0, 1.02))
    written.append(save(fig, os.path.join(out_dir, f"tau_{name}.png"), ax))
  for name, docs in sorted(transfer.items()):
    fig, ax = plt.subplots(figsize=(5, 4))
    fig5, ax5 = plt.subplots(figsize=(5, 4))
    sources_done = set()
    for run, doc in docs.items():
      pts = doc["points"]
      xs = [p["distance"] for p in pts]
      ax.plot(xs, [p["transfer_rate"] if p["transfer_rate"] is not None else float("nan")
                   for p in pts], marker="o", label=_label(run, labels))
      if doc["source"] not in sources_done:
        sources_done.add(doc["source"])
        ax5.plot(xs, [p["l2_mean"] if p["l2_mean"] is not None else float("nan") for p in pts],
                 marker="o", label=f"crafted on {_label(doc['source'], labels)}")
    src = ", ".join(_label(s, labels) for s in sorted(sources_done))
    ax.set(xlabel="feature distance to the target on the source model",
           ylabel="transfer success rate", title=f"Black-box {name} from {src}", ylim=(0, 1.02))
    ax5.set(xlabel="feature distance to the target on the source model",
            ylabel=r"mean $\|x_{adv} - x_s\|_2$", title=f"Perturbation of {name} examples")
    for a, f, stem in ((ax, fig, "transfer"), (ax5, fig5, "perturbation")):
      written.append(save(f, os.path.join(out_dir, f"{stem}_{name}.png"), a))
  return written


def main(argv):
  from absl import flags
  del argv
  FLAGS = flags.FLAGS
  runs = [r for r in FLAGS.runs.split(",") if r]
  labels = dict(zip(runs, FLAGS.labels.split(","))) if FLAGS.labels else {}
  try:
    written = plot(runs, FLAGS.out, labels)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise SystemExit(f"error: {e}") from None
  for p in written:
    print(f"wrote {p}")


def _define_flags():
  from absl import flags
  flags.DEFINE_string("runs", None, "comma-separated run directories")
  flags.DEFINE_string("labels", "", "comma-separated legend labels (default: loss_method)")
  flags.DEFINE_string("out", "figures", "output folder for the PNGs")
  flags.mark_flags_as_required(["runs"])


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
