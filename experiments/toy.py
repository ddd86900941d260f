"""The toy world and its demo, run from the repository root:

    python -m experiments.toy build     # once, about 5.5 minutes on 2 cores: ~/.cache/srpo-toy (or $SRPO_TOY_DIR)
    python -m experiments.toy paths     # print again the train.py, sample.py and evaluate.py commands that use it
    python -m experiments.toy demo      # about 2.5 minutes more: out/toy/report.md with its figures
    python -m experiments.toy hacking   # about 12 minutes more: reward hacking of a biased reward, out/hacking/
    python -m experiments.toy nf4       # a few minutes more: LoRA on a 4-bit base against the fp32 base, out/toy-nf4/
    python -m experiments.toy alarm     # about 10 minutes more: the hacking alarm, healthy and collapsing runs
    python -m experiments.toy qwen      # about 8 minutes: a Qwen-Image world, its bright/dark steering, out/toy-qwen/

The world and its build are toy_world.py; the demo and its report, toy_demo.py; the reward-hacking comparison,
hacking.py; the 4-bit base's, toy_nf4.py; the alarm's, alarm.py; the Qwen-Image world and its steering, toy_qwen.py.
`build` ends by printing the root commands that use the world: the root's scripts take it only by flag.
"""
import argparse

import torch

from experiments import alarm, hacking, toy_demo, toy_nf4, toy_qwen, toy_world
from inputs import fail


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, what in (("build", "train the toy world (once; a built world is kept)"),
                       ("paths", "print the train.py, sample.py and evaluate.py commands that use a built world"),
                       ("demo", "measure the paper's three claims on a built world, write OUT/report.md"),
                       ("hacking", "a biased reward (built once into the world) and what SRPO, SRPO without its "
                                   "inversion branch, ReFL and DRaFT-K do with it; writes OUT/report.md"),
                       ("nf4", "LoRA trained on a 4-bit (nf4) base against one on the fp32 base, same seed and steps; "
                               "writes OUT/report.md"),
                       ("alarm", "train.py --judge on healthy and collapsing runs, several seeds: false and missed "
                                 "alarms; writes OUT/report.md"),
                       ("qwen", "build the Qwen-Image world (and the FLUX world, for its CLIPs) and measure SRPO's "
                                "+bright -dark against +dark -bright on it; writes OUT/numbers.json")):
        s = sub.add_parser(name, help=what)
        s.add_argument("--seed", type=int, default=0, help="which world")
        s.add_argument("--quick", action="store_true", help="the quick world: seconds, barely trained (for tests)")
        s.add_argument("--root", help="default: $SRPO_TOY_DIR, else ~/.cache/srpo-toy")
        if name == "demo":
            s.add_argument("--out", default="out/toy")
            s.add_argument("--steps", type=int, default=toy_world.SRPO_STEPS, help="SRPO optimizer steps per run")
        if name == "nf4":
            s.add_argument("--out", default="out/toy-nf4")
            s.add_argument("--steps", type=int, default=toy_world.SRPO_STEPS, help="SRPO optimizer steps per run")
        if name == "alarm":
            s.add_argument("--out", default="out/alarm")
        if name == "qwen":
            s.add_argument("--out", default="out/toy-qwen")
            s.add_argument("--steps", type=int, default=toy_qwen.SRPO_STEPS, help="SRPO optimizer steps per run")
            s.add_argument("--train-seeds", type=int, nargs="+", default=[42], help="train.py --seed of each run pair")
        if name == "hacking":
            s.add_argument("--out", default="out/hacking")
            s.add_argument("--seeds", type=int, nargs="+", help=f"training seeds of every method; default "
                           f"{' '.join(map(str, hacking.FULL['seeds']))} (--quick: "
                           f"{' '.join(map(str, hacking.QUICK['seeds']))})")
            s.add_argument("--steps", type=int, help=f"optimizer steps per run; default {hacking.FULL['steps']} "
                                                     f"(--quick: {hacking.QUICK['steps']})")
    args = p.parse_args(argv)
    # 2 threads: the times quoted are for 2 cores, and a float sum's order can depend on the thread count
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.command == "qwen":  # builds what it needs: the world's root commands are toy_qwen.train_argv's
        paths = toy_qwen.build(args.root, args.seed, args.quick)
        toy_qwen.steering(paths, args.out, args.steps, seeds=args.train_seeds)
        return
    if args.command == "build":
        paths = toy_world.build(args.root, args.seed, args.quick)
    else:
        paths = toy_world.toy_model_paths(args.root, args.seed, args.quick)
        if paths is None:
            flags = "".join(f" --{k} {v}" for k, v in (("seed", args.seed), ("root", args.root)) if v) + \
                (" --quick" if args.quick else "")
            fail(f"no toy world at {toy_world.world_dir(args.root, args.seed, args.quick)}: "
                 f"run python -m experiments.toy build{flags} first")
    if args.command == "demo":
        toy_demo.demo(paths, args.out, args.steps)
    elif args.command == "nf4":
        toy_nf4.comparison(paths, args.out, args.steps)
    elif args.command == "alarm":
        alarm.comparison(paths, args.out, alarm.QUICK if args.quick else alarm.FULL)
    elif args.command == "hacking":
        size = hacking.QUICK if args.quick else hacking.FULL
        hacking.comparison(paths, args.out, args.seed, args.quick, args.seeds or size["seeds"],
                           args.steps or size["steps"], size["images_per_prompt"])
    else:
        toy_world.print_commands(paths)


if __name__ == "__main__":
    main()
