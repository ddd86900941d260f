"""Where a training step's time goes, by kind of kernel and by phase, at FLUX.1-dev's width: one train.py step on
the bare model (flux.rollout, then srpo_step with both branches, then clip + AdamW, as gpu.step_parts runs them)
under torch.profiler, after one warm-up step (issue #28: "a profile first ... so the work goes where the time is").

    python -m experiments.profile --quick                   # tiny sizes: about a minute on a 2-core CPU
    python -m experiments.profile --json out/profile.json --trace out/profile-trace.json.gz  # a GPU: gpu.GPU's sizes,
        # FLUX.1-dev's width (24 x 128), 2 + 4 blocks, 720 px, 512 T5 tokens, its VAE, a ViT-H-14 reward; about
        # 3 min on an H100 or H200 (estimated: writing the models, imports and the trace's parsing take most of it)

Kinds: matmul, attention, norms and rotary, elementwise and casts, the VAE, the reward, communication (none in
this one process: FSDP's collectives need ranks), the optimizer, other, and idle (on a CPU: time in no op, Python
between ops; on a GPU: no kernel running, the launch gaps). An op's kind is its own name's (aten::addmm is a
matmul, aten::to a cast), else its nearest enclosing op's (aten::rms_norm's pow is a norm); the VAE, the reward and
the optimizer are the record_function scopes placed here around decode, the reward's srp and the update, which take
every op inside them; the rotary embedding is a scope placed around diffusers' apply_rotary_emb.
A backward op takes the kind and scope of the forward op whose gradient it computes (autograd's sequence number
links the two), so the VAE's backward is the VAE's. Times are self times: each op's own CPU time on a CPU, the
device time of the kernels it launched on a GPU; they partition the step, so the kinds sum to its total.
FLOPs are counted from the recorded shapes, not by the profiler's with_flops: a matmul's 2 m n k, attention's
4 B H Lq Lk D forward and twice that backward (torch's FlopCounterMode's convention). Norms, activations, softmax,
rotary, convolutions are not counted; the VAE's and the reward's FLOPs are theirs, not matmul's.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import tempfile
import types
from contextlib import ExitStack, contextmanager, nullcontext

import torch
from diffusers.models.transformers import transformer_flux
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile, record_function

import train
from experiments.gpu import GPU, TINY, forward_flops
from experiments.measure import CAPTION, load_models, machine, md_table, pick_device, timed, write_models
from flux import autocast, decode, latent_noise, rollout, velocity
from inputs import fail
from srpo import srpo_step

SCOPE = "profile/"  # the record_function scopes this script places
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
KINDS = ("matmul", "attention", "norms and rotary", "elementwise and casts", "VAE", "reward", "communication",
         "optimizer", "other", "idle")
PHASES = ("rollout", "forward", "backward", "optimizer", "rest")  # rest: the loss, .item(), Euler arithmetic
COMPONENTS = {SCOPE + "vae": "VAE", SCOPE + "reward": "reward", SCOPE + "optimizer": "optimizer"}
BACKWARD_NODE = "autograd::engine::evaluate_function: "
MATMUL_FLOPS = {"aten::mm", "aten::addmm", "aten::_addmm_activation", "aten::bmm", "aten::baddbmm"}  # the leaves
ATTENTION = re.compile(r"aten::_?(scaled_dot_product|flash_attention|efficient_attention)")
# the fused kernels' ops, q, k, v (B, H, L, D) first (grad_out before them backward): FLOPs counted here, not in the
# ops they call, nor in the math fallback, whose bmm are counted as matmuls
ATTENTION_FLOPS = re.compile(r"aten::_scaled_dot_product_(flash|efficient|cudnn|fused)_attention")
NORMS = re.compile(r"aten::(native_|_fused_)?(layer_norm|rms_norm|group_norm)(_backward)?$|" + SCOPE + "rotary$")
CASTS = {"aten::to", "aten::_to_copy", "aten::copy_", "aten::type_as"}
ELEMENTWISE = re.compile(r"aten::(add|sub|mul|div|neg|pow|sqrt|rsqrt|exp|log|tanh|sigmoid|gelu|silu|relu|clamp|where|"
                         r"lerp|addcmul|addcdiv|cat|stack|fill|zero|sin|cos|abs|threshold)(_backward)?_?$")
COMMUNICATION = re.compile(r"nccl|gloo|c10d|all_reduce|allreduce|reduce_scatter|all_gather|broadcast", re.I)
# a GPU kernel whose op tells nothing (an "other"), by its own name
KERNELS = [(re.compile(r"gemm|cutlass|nvjet|cublas|xmma", re.I), "matmul"),
           (re.compile(r"flash|fmha|attention", re.I), "attention"), (COMMUNICATION, "communication"),
           (re.compile(r"norm", re.I), "norms and rotary"),
           (re.compile(r"elementwise|copy|cast|CatArray", re.I), "elementwise and casts")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    a("--quick", action="store_true", help="gpu.TINY's sizes and reward, seconds on a CPU (explicit flags still win)")
    # default: gpu.GPU's model, FLUX.1-dev's width at 2 + 4 of its 19 + 38 blocks
    a("--resolution", type=int, default=GPU["resolution"], help="square image size, a multiple of 16")
    a("--layers", type=int, default=GPU["layers"], help="double-stream blocks (FLUX.1-dev: 19)")
    a("--single-layers", type=int, default=GPU["single_layers"], help="single-stream blocks (FLUX.1-dev: 38)")
    a("--heads", type=int, default=GPU["heads"], help="attention heads (FLUX.1-dev: 24)")
    a("--head-dim", type=int, default=GPU["head_dim"], help="even, at least 8 (FLUX.1-dev: 128)")
    a("--vae-width", type=int, default=GPU["vae_width"], help="VAE channels, x1 x2 x4 x4 by block (FLUX.1-dev: 128)")
    a("--text-len", type=int, default=GPU["text_len"], help="T5 tokens (FLUX.1-dev: 512)")
    a("--rollout-steps", type=int, default=train.parse_args([]).rollout_steps, help="the rollout's sampler steps")
    a("--attention", default="train", choices=("train", *BACKENDS),
      help="the attention kernel: train.py's choice (cuDNN's off: its backward failed at 720x720 on torch 2.11, "
           "train.init_distributed), or one forced, to see whether cuDNN's now runs and what each costs")
    a("--json", help="write every number to this file as well")
    a("--trace", help="write the profiled step as a Chrome trace (chrome://tracing, ui.perfetto.dev)")
    args = p.parse_args(argv)
    sizes = TINY if args.quick else GPU
    if args.quick:  # parse again so that flags given explicitly override these
        p.set_defaults(**{k: TINY[k] for k in ("resolution", "layers", "single_layers", "heads", "head_dim",
                                                "vae_width", "text_len")})
        args = p.parse_args(argv)
    args.text_width, args.pooled_width, args.reward = sizes["text_width"], sizes["pooled_width"], sizes["reward"]
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is visible")
    if args.resolution % 16:
        fail(f"--resolution {args.resolution}: must be a multiple of 16 (8x VAE, then 2x2 patches)")
    if args.head_dim % 2 or args.head_dim < 8:
        fail(f"--head-dim {args.head_dim}: must be even and at least 8 (rotary axes of even sizes)")
    return args


# ----------------------------------------------------------------------------------------- the step, in scopes

def scoped(fn, *names):
    """fn inside the record_function scopes names (SCOPE + each)."""
    def run(*args, **kwargs):
        with ExitStack() as stack:
            for name in names:
                stack.enter_context(record_function(SCOPE + name))
            return fn(*args, **kwargs)
    return run


@contextmanager
def rotary_scoped():
    """diffusers' FLUX attention applies the rotary embedding with elementwise ops, told apart by a scope only."""
    original = transformer_flux.apply_rotary_emb
    transformer_flux.apply_rotary_emb = scoped(original, "rotary")
    try:
        yield
    finally:
        transformer_flux.apply_rotary_emb = original


def step(m, noise, index):
    """One train.py step on the bare model, as gpu.step_parts runs it, each part in its scope; on a GPU it waits for
    the last kernel, so that the step's scope spans them all."""
    targs = m.targs
    x0 = scoped(rollout, "rollout")(m.transformer, noise, m.cond, targs.rollout_steps, targs.shift,
                                    targs.rollout_guidance)
    reward = types.SimpleNamespace(srp=scoped(m.reward.srp, "forward", "reward"))
    srpo_step(scoped(lambda x, s: velocity(m.transformer, x, s, m.cond, targs.guidance), "forward"),
              scoped(lambda x: decode(m.vae, x, m.res), "forward", "vae"), reward, x0, noise, CAPTION, index,
              train.rng(0, "t", index), **train.step_settings(targs), autocast=lambda: autocast(m.device))
    with record_function(SCOPE + "optimizer"):
        torch.nn.utils.clip_grad_norm_(m.transformer.parameters(), targs.max_grad_norm)
        m.optimizer.step()
        m.optimizer.zero_grad(set_to_none=True)
    if m.device.type == "cuda":
        torch.cuda.synchronize()


def profiled_step(m, noise):
    """A warm-up step, one timed without the profiler (its overhead is the ratio of the two), one profiled."""
    with rotary_scoped():
        step(m, noise, 0)
        unprofiled_s = timed(lambda: step(m, noise, 1), m.device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if m.device.type == "cuda" else [])
        with profile(activities=activities, record_shapes=True) as prof:
            with record_function(SCOPE + "step"):
                step(m, noise, 2)
    return prof, unprofiled_s


# ----------------------------------------------------------------------------------------- classifying the ops

def snake(camel):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def forward_op_of(events):
    """backward node event -> the forward op whose gradient it computes. The node carries its forward op's
    sequence number and thread; several nested ops share a number (aten::linear and the aten::t it calls), so the
    one named as the node is taken (MmBackward0: aten::mm), else the innermost."""
    by_number = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith(BACKWARD_NODE):
            by_number.setdefault((e.thread, e.sequence_nr), []).append(e)

    def depth(e):
        return 0 if e.cpu_parent is None else 1 + depth(e.cpu_parent)

    def find(node):
        ops = by_number.get((node.fwd_thread, node.sequence_nr))
        if not ops:
            return None
        stem = snake(re.sub(r"Backward\d*$", "", node.name.removeprefix(BACKWARD_NODE)))
        named = [e for e in ops if e.name.removeprefix("aten::").lstrip("_") == stem]
        return (named or sorted(ops, key=depth))[-1]
    return find


def context(e, forward_op):
    """e's enclosing events, innermost first; in the backward pass continued by its forward op's."""
    chain = []
    while e is not None:
        chain.append(e)
        if e.name.startswith(BACKWARD_NODE):
            op = forward_op(e)
            return chain, chain + (context(op, forward_op)[0] if op else [])
        e = e.cpu_parent
    return chain, chain


def strong_kind(name):
    if name in MATMUL_FLOPS or name in ("aten::linear", "aten::matmul"):
        return "matmul"
    if ATTENTION.match(name):
        return "attention"
    if NORMS.match(name):
        return "norms and rotary"
    if name in CASTS:
        return "elementwise and casts"
    if COMMUNICATION.search(name):
        return "communication"


def classify(e, forward_op):
    """(kind, phase) of a CPU op event."""
    own, linked = context(e, forward_op)
    names = [x.name for x in linked]
    kind = next((COMPONENTS[n] for n in reversed(names) if n in COMPONENTS), None) \
        or next((k for k in map(strong_kind, names) if k), None)
    if kind is None:
        name = e.name
        idle = name.startswith(SCOPE) or name.startswith("autograd::engine")
        kind = "idle" if idle else "elementwise and casts" if ELEMENTWISE.match(name) else "other"
    if any(x.name.startswith(BACKWARD_NODE) for x in own):
        return kind, "backward"
    return kind, next((n.removeprefix(SCOPE) for n in (x.name for x in own)
                       if n in (SCOPE + "rollout", SCOPE + "forward", SCOPE + "optimizer")), "rest")


def flops(e):
    """FLOPs of a matmul or attention op from its input shapes; 0 for any other op."""
    shapes = e.input_shapes
    if e.name in MATMUL_FLOPS:
        a, b = shapes[:2] if e.name in ("aten::mm", "aten::bmm") else shapes[1:3]  # addmm: the bias first
        batch = a[0] if len(a) == 3 else 1
        return 2 * batch * a[-2] * a[-1] * b[-1]
    if ATTENTION_FLOPS.match(e.name):
        backward = e.name.endswith("_backward")
        q, k, v = shapes[backward:backward + 3]
        return (1 + backward) * 2 * q[0] * q[1] * q[2] * k[2] * (q[3] + v[3])
    return 0


# ----------------------------------------------------------------------------------------- the tally

def tally(prof, device):
    """Seconds, calls and FLOPs by kind and phase over the profiled step; on a GPU the kernels' timeline too.
    A GPU's idle time is counted in gaps between kernels, each gap in the phase of the kernel after it."""
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU and not e.is_async]
    scope = next(e for e in events if e.name == SCOPE + "step")
    forward_op = forward_op_of(events)
    seconds = {(k, p): 0.0 for k in KINDS for p in PHASES}
    calls, counted = dict.fromkeys(KINDS, 0), {(k, p): 0 for k in KINDS for p in PHASES}
    launches = None
    classes = {}
    for e in events:
        if scope.time_range.start <= e.time_range.start and e.time_range.end <= scope.time_range.end:
            kind, phase = classes[e.id] = classify(e, forward_op)
            counted[kind, phase] += flops(e)
            if device.type == "cpu":
                seconds[kind, phase] += e.self_cpu_time_total / 1e6
                calls[kind] += kind != "idle"  # idle's events are scopes and autograd's nodes, not ops
    total = scope.time_range.elapsed_us() / 1e6
    if device.type == "cuda":
        launches = kernel_timeline(prof, scope, classes, seconds, calls)
    return dict(total_s=total, seconds=seconds, calls=calls, flops=counted, launches=launches)


def kernel_timeline(prof, scope, classes, seconds, calls):
    """Adds each GPU kernel's (and memcpy's, memset's) time to the kind and phase of the op that launched it, and
    the gaps in which none ran to idle; returns the launch statistics: kernels, busy and idle seconds, the host's
    seconds in the CUDA launch calls."""
    raw = prof.profiler.kineto_results.events()
    start = next(e.start_ns() for e in raw if e.name() == SCOPE + "step" and e.device_type() == DeviceType.CPU)
    kernels = sorted((e for e in raw if e.device_type() == DeviceType.CUDA and e.linked_correlation_id() > 0
                      and not e.is_user_annotation()), key=lambda e: e.start_ns())
    end_of_busy, busy_ns, idle_ns = start, 0, 0
    for k in kernels:
        kind, phase = classes.get(k.linked_correlation_id(), ("other", "rest"))
        if kind == "other":
            kind = next((kk for pattern, kk in KERNELS if pattern.search(k.name())), "other")
        seconds[kind, phase] += k.duration_ns() / 1e9
        calls[kind] += 1
        gap = max(0, k.start_ns() - end_of_busy)
        seconds["idle", phase] += gap / 1e9
        idle_ns += gap
        busy_ns += max(0, k.end_ns() - max(k.start_ns(), end_of_busy))
        end_of_busy = max(end_of_busy, k.end_ns())
    tail = max(0, start + scope.time_range.elapsed_us() * 1000 - end_of_busy)  # the synchronize after the last
    seconds["idle", "rest"] += tail / 1e9
    host = [e for e in raw if e.device_type() == DeviceType.CPU and "LaunchKernel" in e.name()]
    return dict(kernels=len(kernels), busy_s=busy_ns / 1e9, idle_s=(idle_ns + tail) / 1e9,
                overlap_s=sum(k.duration_ns() for k in kernels) / 1e9 - busy_ns / 1e9,
                mean_gap_us=idle_ns / 1e3 / max(1, len(kernels)), launch_calls=len(host),
                launch_call_s=sum(e.duration_ns() for e in host) / 1e9)


# ----------------------------------------------------------------------------------------- the report

def summary(t, args, m, unprofiled_s):
    """The tally as the numbers --json writes: by kind, by phase, the whole step against forward_flops."""
    total = t["total_s"]
    by_kind = {k: dict(seconds=sum(t["seconds"][k, p] for p in PHASES), calls=t["calls"][k],
                       flops=sum(t["flops"][k, p] for p in PHASES)) for k in KINDS}
    by_phase = {p: dict(seconds=sum(t["seconds"][k, p] for k in KINDS),
                        flops=sum(t["flops"][k, p] for k in ("matmul", "attention")),
                        kinds={k: t["seconds"][k, p] for k in KINDS},
                        kind_flops={k: t["flops"][k, p] for k in KINDS}) for p in PHASES}
    for row in [*by_kind.values(), *by_phase.values()]:
        row.update(share=row["seconds"] / total, tflops=row["flops"] / row["seconds"] / 1e12 if row["seconds"] else 0)
    image_tokens = (args.resolution // 16) ** 2
    forward = forward_flops(args.layers, args.single_layers, args.heads * args.head_dim, args.text_len, image_tokens,
                            args.text_width, args.pooled_width)
    branches = 2 if m.targs.branches == "both" else 1
    recompute = int(m.transformer.is_gradient_checkpointing)
    # gpu.full_depth's count: the rollout's calls and per branch a forward, its recomputation, a backward of 2x
    estimate = forward * (m.targs.rollout_steps + branches * (3 + recompute))
    counted = by_kind["matmul"]["flops"] + by_kind["attention"]["flops"]
    return dict(machine=machine(m.device), date=datetime.date.today().isoformat(), device=m.device.type,
                config=dict(vars(args), rollout_steps=m.targs.rollout_steps, branches=branches,
                            checkpointing=bool(recompute), image_tokens=image_tokens),
                flops_source="shapes", total_s=total, unprofiled_s=unprofiled_s, kinds=by_kind, phases=by_phase,
                step=dict(forward_flops=forward, estimated_flops=estimate, counted_flops=counted,
                          estimated_tflops=estimate / total / 1e12, counted_tflops=counted / total / 1e12),
                launches=t["launches"])


def report(s):
    ms = lambda x: f"{1e3 * x:.1f}"  # noqa: E731
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    tf = lambda row: f"{row['flops'] / 1e9:.2f}" if row["flops"] else ""  # noqa: E731
    rate = lambda row: f"{row['tflops']:.3g}" if row["flops"] else ""  # noqa: E731
    c = s["config"]
    what = "device time of the kernels" if s["device"] == "cuda" else "CPU self time of the ops"
    print(f"machine: {s['machine']}, {s['date']}\nmodel: FLUX architecture, random weights, {c['layers']} double + "
          f"{c['single_layers']} single blocks of {c['heads']}x{c['head_dim']}, VAE width {c['vae_width']}, "
          f"{c['resolution']} px ({c['image_tokens']} image + {c['text_len']} text tokens), {c['rollout_steps']} "
          f"rollout steps, {c['branches']} branches, checkpointing {'on' if c['checkpointing'] else 'off'}\n"
          f"one step, profiled: {ms(s['total_s'])} ms ({ms(s['unprofiled_s'])} ms without the profiler); times are "
          f"the {what}; FLOPs from the ops' shapes\n")
    print(md_table(["kind", "ms", "share", "ops" if s["device"] == "cpu" else "kernels", "GFLOP", "TFLOP/s"],
                   [[k, ms(r["seconds"]), pct(r["share"]), r["calls"], tf(r), rate(r)]
                    for k, r in s["kinds"].items()]))
    print(md_table(["phase", "ms", "share", "matmul + attention GFLOP", "TFLOP/s over the phase", "largest kinds"],
                   [[p, ms(r["seconds"]), pct(r["share"]), tf(r), rate(r),
                     ", ".join(f"{k} {pct(v / r['seconds'])}" for k, v in
                               sorted(r["kinds"].items(), key=lambda kv: -kv[1])[:3] if v)]
                    for p, r in s["phases"].items()]))
    st = s["step"]
    print(md_table(["the whole step", "TFLOP", "TFLOP/s"],
                   [["counted from the shapes: matmul + attention", f"{st['counted_flops'] / 1e12:.3g}",
                     f"{st['counted_tflops']:.3g}"],
                    ["estimated: gpu.forward_flops x (rollout steps + branches x (3 + recompute))",
                     f"{st['estimated_flops'] / 1e12:.3g}", f"{st['estimated_tflops']:.3g}"]]))
    la = s["launches"]
    if la is None:
        print("kernel launches: on a GPU only (the kernels' timeline)")
    else:
        print(md_table(["kernels", "GPU busy ms", "GPU idle ms", "idle share", "mean gap before a kernel us",
                        "launch calls", "host ms in launch calls"],
                       [[la["kernels"], ms(la["busy_s"]), ms(la["idle_s"]), pct(la["idle_s"] / s["total_s"]),
                         f"{la['mean_gap_us']:.1f}", la["launch_calls"], ms(la["launch_call_s"])]]))


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    root = tempfile.mkdtemp(prefix="srpo-profile-")
    try:
        write_models(root, args.layers, args.single_layers, args.heads, args.head_dim, args.vae_width,
                     args.text_width, args.pooled_width, args.reward)
        m = load_models(root, args.resolution, args.text_len, device, checkpointing=device.type == "cuda",
                        rollout_steps=args.rollout_steps)
        noise = latent_noise(args.resolution, train.rng(0, "noise", 0), device)
        if args.attention == "train":
            torch.backends.cuda.enable_cudnn_sdp(False)  # as train.init_distributed
        with sdpa_kernel(BACKENDS[args.attention]) if args.attention in BACKENDS else nullcontext():
            prof, unprofiled_s = profiled_step(m, noise)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    s = summary(tally(prof, device), args, m, unprofiled_s)
    report(s)
    for path in (args.json, args.trace):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=1)
    if args.trace:
        prof.export_chrome_trace(args.trace)
    return s


if __name__ == "__main__":
    main()
