"""Tests of profile.py, end to end on tiny sizes on the CPU: its times partition the step, its FLOPs from the ops'
shapes equal gpu.forward_flops's closed form, backward ops are traced to their forward ops. Run:
python -m pytest -q experiments/test_profile.py"""
import json

import pytest

from experiments import profile
from experiments.gpu import forward_flops

ROLLOUT_STEPS = 2  # of the run's 25: the counts scale by it, the time does not matter here


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    # flash forced: the fused kernel whose FLOPs are counted from its shapes (the math fallback's are matmuls)
    s = profile.main(["--device", "cpu", "--quick", "--rollout-steps", str(ROLLOUT_STEPS), "--attention", "flash",
                      "--json", str(out / "profile.json"), "--trace", str(out / "trace.json")])
    return s, out


def test_kinds_and_phases_partition_the_step(run):
    s, _ = run
    # self times sum to the step scope's duration up to the profiler's microsecond rounding: nothing dropped or
    # counted twice
    assert sum(r["seconds"] for r in s["kinds"].values()) == pytest.approx(s["total_s"], rel=1e-3)
    assert sum(r["seconds"] for r in s["phases"].values()) == pytest.approx(s["total_s"], rel=1e-3)
    assert all(s["phases"][p]["seconds"] > 0 for p in profile.PHASES)
    assert all(s["kinds"][k]["seconds"] > 0 for k in ("matmul", "attention", "norms and rotary", "VAE", "reward",
                                                       "optimizer"))


def test_flops_from_shapes_equal_forward_flops_closed_form(run):
    s, _ = run
    c = s["config"]
    width, tokens = c["heads"] * c["head_dim"], c["image_tokens"] + c["text_len"]
    forward = forward_flops(c["layers"], c["single_layers"], width, c["text_len"], c["image_tokens"],
                            c["text_width"], c["pooled_width"])
    attention = (c["layers"] + c["single_layers"]) * 4 * tokens**2 * width  # QK^T and PV over all tokens
    rollout, branches = s["phases"]["rollout"]["kind_flops"], s["phases"]["forward"]["kind_flops"]
    assert rollout["matmul"] == ROLLOUT_STEPS * (forward - attention)  # every nn.Linear, 2 x weights x tokens
    assert rollout["attention"] == ROLLOUT_STEPS * attention
    assert branches["matmul"] == c["branches"] * (forward - attention)
    assert branches["attention"] == c["branches"] * attention


def test_backward_ops_take_their_forward_ops_kind(run):
    s, _ = run
    backward = s["phases"]["backward"]
    # no backward op is named for the VAE or the reward: only autograd's link to the forward op's scope finds them
    assert backward["kinds"]["VAE"] > 0 and backward["kinds"]["reward"] > 0
    assert backward["kind_flops"]["attention"] == 2 * s["phases"]["forward"]["kind_flops"]["attention"]


def test_json_and_trace_are_written(run):
    s, out = run
    saved = json.load(open(out / "profile.json"))
    assert saved["kinds"].keys() == set(profile.KINDS) and saved["phases"].keys() == set(profile.PHASES)
    assert {"machine", "date", "total_s", "unprofiled_s", "flops_source", "step", "launches"} <= saved.keys()
    assert saved["step"]["counted_flops"] == s["kinds"]["matmul"]["flops"] + s["kinds"]["attention"]["flops"] > 0
    assert saved["launches"] is None  # a CPU has no kernel timeline
    assert any(e.get("name") == "profile/step" for e in json.load(open(out / "trace.json"))["traceEvents"])
