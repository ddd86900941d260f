"""alarm.py on the quick world: both runs through train.py --judge, the alarms it printed are the ones the report
counts (judge.alarm applied to each run's metrics.jsonl), and the report's cost line. Whether the alarm tells a
collapsing run from a healthy one is the full world's (python -m experiments.toy alarm; experiments/README.md)."""
import json
import os
import re

from PIL import Image

from experiments import alarm, toy


def test_quick_comparison_counts_the_alarms_train_py_printed(world, tmp_path, capsys):
    root = os.path.dirname(os.path.dirname(world["flux"]))
    out = tmp_path / "alarm"
    toy.main(["alarm", "--quick", "--root", root, "--out", str(out)])
    printed = capsys.readouterr().out
    numbers = json.load(open(out / "numbers.json"))
    assert set(numbers) == {f"{name}-seed{seed}" for name in alarm.RUNS for seed in alarm.QUICK["seeds"]}
    fired = [int(step) for step in re.findall(r"hacking alarm at step (\d+):", printed)]
    assert sorted(fired) == sorted(step for r in numbers.values() for step in r["alarms"])
    for name, r in numbers.items():
        assert r["steps"] == [0, alarm.QUICK["steps"]] and len(r["sharpness"]) == 2 and 0 < r["eval_share"] < 1
        assert Image.open(out / name / "eval" / "strips.png").height > 0 and (out / name / "metrics.png").exists()
        assert not any(p.startswith("checkpoint-") for p in os.listdir(out / name))  # 20 MB each, removed
    assert Image.open(out / "alarm_strips.png").height == 18 + 2 * 48  # steps 0 and 4, a row each
    report = (out / "report.md").read_text()
    assert all(f"| {name} | 0 |" in report for name in alarm.RUNS) and "False alarms (healthy runs" in report
    assert re.search(r"Planned for FLUX.1-dev .*: \d+\.\d% on 8 GPUs", report)


def test_planned_share_is_the_arithmetic_of_its_docstring(tmp_path):
    x = dict(rollout_s=3.0, sample_image_s=10.0, sample_transformer_s=9.5, prompt_s=5.0)  # a held-out prompt: 3.5 s
    (tmp_path / "m.json").write_text(json.dumps({"extrapolation": x}))
    # 8 GPUs: 2 held-out prompts each, 5 evaluations (steps 0, 5, 10, 15, 20): 35 s; training 20 x 4 x 5 s = 400 s
    assert abs(alarm.planned_share(16, 5, 20, 8, tmp_path / "m.json") - 35 / 435) < 1e-12
    assert abs(alarm.planned_share(16, 10, 20, 1, tmp_path / "m.json") - 3 * 56 / (3 * 56 + 20 * 32 * 5)) < 1e-12
