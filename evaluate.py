r"""Score sample.py's images with HPSv2.1, PickScore or CLIP, and compare two folders the way the paper's
tables compare FLUX.1-dev and SRPO: mean per folder, and the paired win rate and mean difference.

CPU, the tiny random reward (no download):
    python evaluate.py out/compare/base out/compare/srpo --reward hps pickscore clip
The real reward models, one --reward-path per --reward, in the same order:
    python evaluate.py out/compare/base out/compare/srpo --reward hps pickscore clip \
        --reward-path HPS_v2.1_compressed.pt PickScore_v1 CLIP-ViT-H-14-laion2B-s32B-b79K \
        --clip-h CLIP-ViT-H-14-laion2B-s32B-b79K --json out/compare/scores.json

Each folder needs the prompts.jsonl that sample.py writes; the score of an image is srpo_reward.py's plain
score (METHOD.md §4) of the image and its prompt. Two folders are paired by file name (sample.py names image i
of the prompt list NNNNN.png and gives it seed + i in both folders), and a pair must share its prompt and
sample.py's settings (seed, size, steps, guidance, T5 length):
    d_i = score(DIR2 image i) - score(DIR1 image i)
    win rate = mean(d_i > 0) + 0.5 * mean(d_i == 0)         (a tie counts half)
    mean diff = mean(d_i), its 95% interval = the 2.5 and 97.5 percentiles of the means of 10,000 resamples
                (with replacement, fixed seed) of the d_i: a percentile bootstrap.
"""
import json
import logging
import os

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # notes at import with nothing to act on (train.py's)
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
import numpy as np
import torch
from PIL import Image

from inputs import Parser, check_clip_h, check_ranges, fail, read_text, run_command
from srpo_reward import KINDS, load_reward

RESAMPLES = 10_000  # bootstrap resamples: enough that the ends' Monte Carlo error is about 1% of the width
# What a pair must share besides its prompt: sample.py's settings of the image (the weights are what differs)
PAIRED = ("prompt", "seed", "height", "width", "num_inference_steps", "guidance_scale", "max_sequence_length")


def parse_args(argv=None):
    p = Parser(__doc__)
    p.add_argument("dirs", nargs="+", metavar="DIR", help="one folder, or two: the base, then SRPO")
    p.add_argument("--reward", nargs="+", default=["hps"], choices=KINDS, help="one column each; default hps")
    p.add_argument("--reward-path", nargs="*", default=[],
                   help="one per --reward, same order: HPS_v2.1_compressed.pt for hps, a PickScore_v1 folder "
                        "for pickscore, a CLIPModel folder for clip (none: the tiny random reward for each)")
    p.add_argument("--clip-h", help="the laion/CLIP-ViT-H-14-laion2B-s32B-b79K folder: HPSv2.1's config and "
                                    "tokenizer, and PickScore's tokenizer")
    p.add_argument("--batch-size", type=int, default=16, help="images per reward forward, default 16")
    p.add_argument("--json", help="also write the numbers to this file")
    return p.parse_args(argv)


def read_records(folder):
    """The objects of folder/prompts.jsonl, one per image, each with at least 'file' and 'prompt'."""
    path = os.path.join(folder, "prompts.jsonl")
    pair = [os.path.join(folder, sub) for sub in ("base", "srpo")]
    if not os.path.isfile(path) and all(os.path.isfile(os.path.join(p, "prompts.jsonl")) for p in pair):
        fail(f"{folder}: a sample.py --compare folder; expected its two folders, {pair[0]} {pair[1]}")
    if not os.path.isfile(path):
        fail(f"{path}: not found (expected the prompts.jsonl that sample.py writes beside its images)")
    records = []
    for n, line in enumerate(read_text(path, "", "what sample.py writes").splitlines(), 1):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            r = None
        if not (isinstance(r, dict) and isinstance(r.get("file"), str) and isinstance(r.get("prompt"), str)):
            fail(f"{path}:{n}: expected a JSON object with 'file' and 'prompt'")
        records.append(r)
    if not records:
        fail(f"{path}: no images listed")
    return records


def load_images(paths, records, size=None):
    """The images as one float tensor (B, 3, H, W) in [0, 1], all of one size: size (H, W), if given. Each is the
    image its record names: the prompt and seed sample.py wrote into the PNG are the record's, so a file renamed or
    swapped is not scored against another prompt."""
    images = []
    for path, r in zip(paths, records, strict=True):
        try:
            with Image.open(path) as im:
                images.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
                made = getattr(im, "text", {})
        except Exception as e:  # a damaged file: PIL's decoders raise OSError, SyntaxError, EOFError, struct.error...
            fail(f"{path}: cannot open as an image ({type(e).__name__}: {e})".splitlines()[0])
        key = next((k for k in ("prompt", "seed") if k in made and k in r and made[k] != str(r[k])), None)
        if key:
            fail(f"{path}: made with {key} {made[key]!r}, its prompts.jsonl line says {r[key]!r} (a file renamed or "
                 f"swapped?); expected sample.py's folder as it wrote it")
    if len({tuple(im.shape[1:]) for im in images} | ({tuple(size)} if size else set())) > 1:
        fail(f"{os.path.dirname(paths[0])}: images of different sizes; expected one sample.py run")
    return torch.stack(images).float() / 255


def load_rewards(kinds, paths, clip_h, device):
    """{kind: (SRPReward, what was loaded)}; with no paths, the tiny random CLIP of tiny.py for every kind."""
    if not paths and len(kinds) > 1:  # every column would score with the one tiny model
        fail(f"--reward {' '.join(kinds)} without --reward-path: each would be the tiny random CLIP; expected a "
             f"--reward-path for each, or one --reward")
    if paths and len(paths) != len(kinds):
        fail(f"--reward-path: got {len(paths)} for --reward {' '.join(kinds)}; expected one per "
             f"--reward in the same order, or none (the tiny reward)")
    check_clip_h(clip_h, dict(zip(kinds, paths)))
    if not paths:  # the tiny random CLIP for every kind
        from tiny import tiny_model_paths
        paths, clip_h = [tiny_model_paths()[1]] * len(kinds), None
    rewards = {}
    for kind, path in zip(kinds, paths):
        tokenizer_dir = clip_h if kind != "clip" else None  # CLIP-H's tokenizer is HPSv2.1's and PickScore's
        try:
            reward = load_reward(kind, path, tokenizer_dir, device=device)
        except (OSError, ValueError) as e:  # srpo_reward's are one line; a tokenizer's may be several
            fail(f"--reward-path for {kind}: {str(e).splitlines()[0]}")
        rewards[kind] = reward, {"path": path, "clip_h": tokenizer_dir}
    return rewards


@torch.no_grad()
def score_folder(reward, folder, records, batch_size):
    """srpo_reward's plain score of each image with its prompt, in the order of records (METHOD.md §4)."""
    scores, size = [], None
    for i in range(0, len(records), batch_size):
        batch = records[i:i + batch_size]
        images = load_images([os.path.join(folder, r["file"]) for r in batch], batch, size).to(reward.model.device)
        size = images.shape[-2:]  # the first batch's: every later one must match it
        scores.append(reward.score(images, [r["prompt"] for r in batch]).float().cpu())
    return torch.cat(scores)


def paired_stats(d, resamples=RESAMPLES, seed=0):
    """(win rate, mean diff, (lo, hi)) of the paired differences d_i = DIR2 - DIR1; see the docstring above."""
    d = torch.as_tensor(d, dtype=torch.float64)
    win_rate = ((d > 0).double() + 0.5 * (d == 0).double()).mean().item()
    g = torch.Generator().manual_seed(seed)
    # 1,000 resamples at a time keeps the index tensor small for thousands of images
    means = torch.cat([d[torch.randint(len(d), (1000, len(d)), generator=g)].mean(1)
                       for _ in range(resamples // 1000)])
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return win_rate, d.mean().item(), (lo, hi)


def main(argv=None):
    args = parse_args(argv)
    if len(args.dirs) > 2:
        fail(f"DIR: got {len(args.dirs)} folders; expected one, or two (base, then SRPO)")
    check_ranges(args, [("batch_size", lambda v: 1 <= v <= 1024,  # a batch's images are decoded and held at once
                         "1 to 1024 images per reward forward")])
    if len(set(args.reward)) != len(args.reward):
        fail(f"--reward {' '.join(args.reward)}: each reward at most once")
    records = {folder: read_records(folder) for folder in args.dirs}
    if len(args.dirs) == 2:  # pairs by file name; checked before any model is loaded
        first, second = ({r["file"]: r for r in records[f]} for f in args.dirs)
        files = sorted(first.keys() & second.keys())
        if not files:
            fail(f"{args.dirs[0]} and {args.dirs[1]}: no image file name in both; expected two "
                 f"sample.py runs of one prompt list")
        if len(files) < max(len(first), len(second)):  # the means would be over different prompts: said
            print(f"note: {args.dirs[0]} has {len(first)} images, {args.dirs[1]} {len(second)}; each folder's mean "
                  f"is over its own, the paired numbers over the {len(files)} in both")
        for file in files:
            key = next((k for k in PAIRED if first[file].get(k) != second[file].get(k)), None)
            if key:
                fail(f"{file}: its {key} differs between {args.dirs[0]} and {args.dirs[1]}; expected "
                     f"two sample.py runs of one prompt list with the same settings")
    if args.json:  # written at the end: its folder is made now, so no scoring is lost to a missing one
        if os.path.isdir(args.json):
            fail(f"--json {args.json}: a folder (expected a file name to write the numbers to)")
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # fp32 on both: the numbers should not depend on it
    rewards = load_rewards(args.reward, args.reward_path, args.clip_h, device)

    scores, per_image, summary, paired = {}, [], [], []
    for kind, (reward, _) in rewards.items():
        for folder in args.dirs:
            s = scores[kind, folder] = score_folder(reward, folder, records[folder], args.batch_size)
            per_image += [dict(folder=folder, file=r["file"], prompt=r["prompt"], reward=kind, score=v)
                          for r, v in zip(records[folder], s.tolist())]
            # std of the images themselves (numpy's default, no n - 1), so one image has std 0, not nan
            summary.append(dict(folder=folder, reward=kind, mean=s.mean().item(), std=s.std(correction=0).item(),
                                n=len(s)))
        if len(args.dirs) == 2:
            by_file = [{r["file"]: v for r, v in zip(records[f], scores[kind, f].tolist())} for f in args.dirs]
            d = [by_file[1][file] - by_file[0][file] for file in files]
            win_rate, mean_diff, ci95 = paired_stats(d)
            paired.append(dict(reward=kind, win_rate=win_rate, mean_diff=mean_diff, ci95=list(ci95), n=len(d)))

    # The table: one column per reward.
    rows = []
    for folder in args.dirs:
        for stat in ("mean", "std", "n"):
            rows.append((f"{folder}  {stat}", [f"{s[stat]:.4f}" if stat != "n" else str(s[stat])
                                               for s in summary if s["folder"] == folder]))
    if paired:
        rows += [(f"win rate of {args.dirs[1]} over {args.dirs[0]}", [f"{p['win_rate']:.3f}" for p in paired]),
                 ("mean difference (second - first)", [f"{p['mean_diff']:+.4f}" for p in paired]),
                 ("  95% bootstrap interval", [f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]" for p in paired]),
                 ("  pairs", [str(p["n"]) for p in paired])]
    width = max(len(label) for label, _ in rows)
    print(" " * width + "".join(f"{kind:>22}" for kind in rewards))
    for label, cells in rows:
        print(f"{label:<{width}}" + "".join(f"{c:>22}" for c in cells))
    if args.json:
        out = dict(per_image=per_image, summary=summary, reward_paths={k: p for k, (_, p) in rewards.items()})
        if paired:
            out["paired"] = paired
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
        print(f"{args.json}: written")


if __name__ == "__main__":
    run_command(main, "the same command scores the folders again")
