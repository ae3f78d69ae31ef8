"""Reads a run's TensorBoard event files with TensorBoard's own reader and compares every scalar with the run's
metrics.jsonl (run by hand; CI needs no Python):

    python tools/check_tensorboard.py checkpoints/runs/quickstart [--out tests/fixtures/tensorboard_check.json]

Every numeric field of a metrics line is expected as the scalar `<stage>/<field>` (held-out accuracy lines as
`<stage>/heldout/<task>/accuracy`) at the line's step, equal to the f32 value mitune wrote.
"""
import argparse
import json
import struct
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--out")
    a = ap.parse_args()
    acc = EventAccumulator(a.run, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    got = {}
    for t in tags:
        for e in acc.Scalars(t):
            got[(t, e.step)] = e.value
    expected = {}
    for line in open(f"{a.run}/metrics.jsonl"):
        v = json.loads(line)
        stage, step = v.get("stage", "run"), v.get("step", 0)
        prefix = f"{stage}/heldout/{v['heldout']}" if "heldout" in v else stage
        for k, x in v.items():
            if k != "step" and isinstance(x, (int, float)) and not isinstance(x, bool):
                expected[(f"{prefix}/{k}", step)] = f32(float(x))
    # a resumed step is logged twice; the reader keeps the last, as metrics.jsonl's last line wins
    missing = [k for k in expected if k not in got]
    wrong = [k for k in expected if k in got and abs(got[k] - expected[k]) > 1e-6 * max(1.0, abs(expected[k]))]
    result = {
        "run": a.run,
        "scalar_tags": len(tags),
        "points_expected": len(expected),
        "points_read": len(got),
        "missing": len(missing),
        "mismatched": len(wrong),
        "example_tags": sorted(tags)[:6],
        "tensorboard": __import__("tensorboard").__version__,
    }
    result["ok"] = not missing and not wrong and len(expected) > 0
    print(json.dumps(result, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
