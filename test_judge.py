"""Tests of judge.py and train.py --judge: the interval and the alarm's rule against hand computations, and the
held-out evaluation in a run on the tiny models (prompts kept out of training, the strips, metrics.png, the alarm's
line, --stop-when-hacking's checkpoint and resume). The same numbers on any number of ranks: test_train.py's runs
of 1, 2 and 4 ranks. That the alarm tells a hacking run from a healthy one: experiments/alarm.py, on the toy world."""
import json
from unittest import mock

import pytest
from PIL import Image

import judge
import train
from test_faults import FAST, in_process_error
from test_train import train_here
from tiny import tiny_model_paths

# Student's t at 0.975 as printed in tables (3 decimals), by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 15: 2.131, 30: 2.042, 120: 1.980}


def test_interval_is_the_student_t_interval():
    for dof, t in T95.items():  # the table is rounded to 3 decimals; the integral is good to about 1e-6
        assert abs(judge.t_quantile(dof) - t) <= 5e-4 + 1e-5, dof
    assert judge.t_quantile(2) == pytest.approx((2 / (1 / 0.95 ** 2 - 1)) ** 0.5, abs=1e-5)  # 2 dof: a closed form
    mean, half = judge.interval([1.0, 2.0, 3.0, 4.0])  # sd sqrt(5/3)
    assert mean == 2.5 and half == pytest.approx(T95[3] * (5 / 3) ** 0.5 / 2, rel=2e-4)  # the table's rounding


def test_the_training_reward_on_held_out_images_is_its_relative_part_over_every_word_pair():
    import torch
    from srpo_reward import load_reward
    reward = load_reward("clip", clip_dir())
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    f_img = reward.embed_images(image)[0]
    # the words of steps 0, 1, 2: (bright, dark), (sharp, dark), (bright, dark), cycled as training cycles them
    pos, neg = reward.embed_texts(["bright. a cat", "sharp. a cat", "bright. a cat"]), reward.embed_texts(
        ["dark. a cat"] * 3)
    expected = (f_img * (pos - neg)).sum(-1).mean() * reward.model.logit_scale.exp() / 20  # clip's SRP scale
    got = judge.relative_score(reward, ["bright", "sharp"], ["dark", "dark", "dark"])(image, "a cat")
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)  # fp32, one order of sums apart
    assert abs(got.item() - reward.srp(image, ["bright. a cat"], ["dark. a cat"], 0.0).item()) > 1e-4  # not one pair


def row(step, judge_scores, reward):
    return {"step": step, **judge.summary({"judge": judge_scores, "reward": [reward] * len(judge_scores)})}


def test_the_alarm_fires_when_the_judge_is_clearly_below_its_best_while_the_reward_rises():
    history = [row(0, [0.50, 0.60, 0.70, 0.80], 0.30), row(5, [0.55, 0.66, 0.74, 0.86], 0.32)]
    # every prompt 0.04 to 0.06 below its score at the best step (5): the differences' interval is -0.0525 +/- 0.0152
    # (t(3) = 3.182, sd 0.0096), all below 0
    now = row(10, [0.49, 0.61, 0.70, 0.80], 0.40)
    best, (mean, half) = judge.alarm(history, now)
    assert best is history[1] and mean == pytest.approx(-0.0525) and mean + half < 0
    line = judge.alarm_line(now, best, (mean, half), "pickscore", "out/checkpoint-5")
    assert line.startswith("hacking alarm at step 10: the judge (pickscore) is at 0.6500, below its best 0.7025 at "
                           "step 5") and line.endswith("0.3200 -> 0.4000; best checkpoint so far: out/checkpoint-5")
    assert judge.alarm(history, row(10, [0.49, 0.61, 0.70, 0.80], 0.31)) is None  # the training reward fell too
    # a lower mean that one prompt contradicts: differences -0.15, -0.15, -0.14, +0.10, interval -0.085 +/- 0.19
    assert judge.alarm(history, row(10, [0.40, 0.51, 0.60, 0.96], 0.40)) is None
    assert judge.alarm([], now) is None and judge.best_of([]) is None
    assert judge.best_of(history, steps={0}) is history[0]  # the best among the steps with a checkpoint


def judged(out, *argv):
    return [*FAST, "--output-dir", out, "--judge", "pickscore", "--judge-path", clip_dir(), *argv]


def clip_dir():
    return tiny_model_paths()[1]


def test_a_judged_run_keeps_its_prompts_out_of_training_and_draws_what_it_saw(tmp_path, capsys):
    out = tmp_path / "out"
    seen = []
    real = train.srpo_step
    with mock.patch.object(train, "srpo_step", side_effect=lambda *a, **k: seen.append(a[5]) or real(*a, **k)):
        train_here(*judged(out, "--steps", "4", "--eval-every", "2", "--eval-count", "2", "--batch-size", "2"))
    said = capsys.readouterr().out
    assert "held out for the judge: 2 of the 6 prompts (--eval-count), never trained on\n" in said
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r for r in rows if "eval_judge" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    held = set(train.TINY_PROMPTS) - set(seen)
    assert len(held) == 2 and len(set(seen)) == 4  # 8 prompts trained: all 4 of the rest, never the 2 held out
    for r in evals:
        assert len(r["eval_judge_scores"]) == 2 and r["eval_judge_ci"][0] <= r["eval_judge"] <= r["eval_judge_ci"][1]
        assert Image.open(out / "eval" / f"step-{r['step']:06d}.png").size == (2 * 32, 32)  # the two, side by side
    assert Image.open(out / "eval" / "strips.png").height == 18 + 3 * 96  # a row per evaluation, 96 px each
    assert Image.open(out / "metrics.png").size == (3 * 480, 2 * 260)  # 3 training curves, then judge and reward
    assert f"best by the judge (pickscore): {out}/checkpoint-" in said or "the base model (step 0)" in said


def test_stop_when_hacking_ends_at_the_alarm_with_a_checkpoint_and_resume_continues(tmp_path, capsys):
    """The alarm's rule is the test above's; here the scores are scripted, to test what train.py does with them."""
    out = tmp_path / "out"
    scripted = iter([([0.5, 0.6], [0.30, 0.30]), ([0.7, 0.8], [0.31, 0.31]),  # step 0, step 1: the best
                     ([0.4, 0.5], [0.40, 0.40]),  # step 2: the judge 0.3 below, the reward up: the alarm
                     ([0.6, 0.7], [0.41, 0.41]), ([0.6, 0.7], [0.42, 0.42])])  # steps 3, 4 after the resume
    evaluate = lambda *a: ({"judge": (s := next(scripted))[0], "reward": s[1]}, None)  # noqa: E731
    argv = judged(out, "--steps", "4", "--eval-every", "1", "--checkpoint-every", "4", "--stop-when-hacking")
    with mock.patch.object(judge, "evaluate", side_effect=evaluate), \
            mock.patch.object(judge, "save_strip"), mock.patch.object(judge, "draw_strips"):
        train_here(*argv)
        said = capsys.readouterr().out
        assert "hacking alarm at step 2: the judge (pickscore) is at 0.4500, below its best 0.7500 at step 1 (now - " \
               "best -0.3000 +/- 0.0000 over 2 held-out prompts), while the training reward rose 0.3100 -> 0.4000; " \
               "best checkpoint so far: the base model (step 0) (judge 0.5500; step 1 scored 0.7500, without a " \
               "checkpoint)\n" in said
        assert "stopped by --stop-when-hacking at step 2; the same command with --resume continues\n" in said
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # saved there, though not due
        train_here(*[a for a in argv if a != "--stop-when-hacking"], "--resume")
        said = capsys.readouterr().out
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "eval_judge" in r] == [0, 1, 2, 3, 4]  # step 0's row kept by the resume
    # the judge's history came back with the resume: at steps 3 and 4 the judge is still 0.1 below step 1's best
    assert said.count("hacking alarm at step") == 2
    assert f"best by the judge (pickscore): {out}/checkpoint-4 (judge 0.6500; step 1 scored 0.7500" in said


def test_judge_flags_are_one_line(tmp_path, capsys):
    out = ["--output-dir", tmp_path / "out"]
    assert in_process_error(train.main, [*FAST, *out, "--judge", "clip"], capsys) == \
        "--judge clip: expected --judge-path (its weights, as --reward-path's)"
    assert in_process_error(train.main, [*FAST, *out, "--stop-when-hacking"], capsys).startswith(
        "--judge-path, --eval-prompts and --stop-when-hacking: expected --judge KIND")
    assert in_process_error(train.main, [*FAST, *out, "--reward", "pickscore", "--reward-path", clip_dir(),
                                         "--judge", "pickscore", "--judge-path", clip_dir()], capsys).endswith(
        ": the training reward; expected a reward training never sees")
    assert in_process_error(train.main, [*judged(tmp_path / "out", "--prompt-order", "release")], capsys).startswith(
        "--judge with --prompt-order release: expected --eval-prompts FILE")
    assert in_process_error(train.main, judged(tmp_path / "out", "--eval-count", "6"), capsys) == \
        "--eval-count 6: expected fewer than the 6 prompts (the rest train); or --eval-prompts FILE"
