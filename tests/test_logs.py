"""faceens.logs: plain progress lines off a terminal, and the metric record shape."""

import io
import json

from faceens import logs


def test_progress_off_a_terminal_writes_plain_lines_every_n_steps():
  out = io.StringIO()  # not a TTY
  bar = logs.progress(total=10, initial=2, desc="arcface_srv_fdp", unit="step", every=3, stream=out)
  assert isinstance(bar, logs.LineProgress)
  for step in range(3, 11):
    bar.set_postfix(loss=f"{1.0 / step:.3f}")
    bar.update(1)
  bar.write("step 6: heldout accuracy 0.9")
  bar.close()
  bar.close()  # idempotent
  text = out.getvalue()
  assert "\r" not in text
  lines = text.splitlines()
  # Steps 3, 6, 9 cross a multiple of 3; the write; the end line from close() at 10/10.
  assert [l.split(":")[1].split()[0] for l in lines if l.startswith("arcface")] == \
      ["3/10", "6/10", "9/10", "10/10"]
  assert lines[3] == "step 6: heldout accuracy 0.9"
  assert "ETA" in lines[0] and "loss=0.333" in lines[0] and "step/s" in lines[0]
  assert "(100%)" in lines[-1] and "loss=0.100" in lines[-1]


def test_progress_inner_loops_are_silent_off_a_terminal():
  out = io.StringIO()
  with logs.progress(total=5, desc="embedding", leave=False, stream=out) as bar:
    bar.update(5)
  assert out.getvalue() == ""


def test_metric_writer_one_record_shape(tmp_path):
  w = logs.MetricWriter(str(tmp_path), tensorboard=False)
  w.write(5, {"train": {"loss": 2.5, "img_per_s": None}})
  w.write(5, {"eval": {"heldout": {"accuracy": 0.75, "member_accuracy": [0.5, 0.25]}}})
  w.close()
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": 5, "train/loss": 2.5},
                   {"step": 5, "eval/heldout/accuracy": 0.75,
                    "eval/heldout/member_accuracy/0": 0.5, "eval/heldout/member_accuracy/1": 0.25}]
