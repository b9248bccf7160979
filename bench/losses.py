"""Loss benchmark: forward + backward wall time of each loss against ClipLoss, and its peak memory.

    .venv/bin/python bench/losses.py [--sizes 1024 4096] [--dim 512] [--repeats 9] [--threads 2]

Time: one process, float32 on the CPU, per batch size N: two warm-up calls of every loss, then
`repeats` rounds in which every loss runs once in turn (so machine noise hits all alike); the
figure is the median over rounds of one forward + backward (features and logit scale are leaf
tensors, as the towers' outputs are), and the ratio is that median over ClipLoss's.

Memory: each (loss, N) runs in a fresh subprocess that builds its inputs, resets the kernel's
resident high-water mark (writing 5 to /proc/self/clear_refs), runs one forward + backward and
reads VmHWM - VmRSS-before from /proc/self/status: the loss's peak extra resident memory (its
N x N matrices and autograd buffers). resource's ru_maxrss cannot be reset (importing torch sets a
higher mark than a loss step), and tracemalloc does not see torch's allocations.

It prints; it asserts nothing. Targets: SoftCLIP <= 2.0x, oblique <= 1.3x, MMCL <= 1.5x.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train.losses import ClipLoss, MMCLLoss, ObliqueLoss, SoftClipLoss

# name -> (loss, oblique tokens K (0: flat features), logit scale, teacher inputs?, target ratio)
CASES = {
    "clip": (ClipLoss, 0, 1 / 0.07, False, None),
    "softclip (self)": (lambda: SoftClipLoss(target="self"), 0, 1 / 0.07, False, 2.0),
    "softclip (teacher)": (lambda: SoftClipLoss(target="teacher"), 0, 1 / 0.07, True, 2.0),
    "oblique (K=16)": (ObliqueLoss, 16, 1.0, False, 1.3),
    "mmcl (clip)": (lambda: MMCLLoss("clip"), 0, 1 / 0.07, False, 1.5),
    "mmcl (linear)": (lambda: MMCLLoss("linear", tau=1.0), 0, 1.0, False, 1.5),
}


def inputs(name: str, n: int, dim: int, seed: int = 0):
    _, k, s, teacher, _ = CASES[name]
    g = torch.Generator().manual_seed(seed)
    shape = (n, k, dim // k) if k else (n, dim)
    v = F.normalize(torch.randn(*shape, generator=g), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(*shape, generator=g), dim=-1).requires_grad_()
    extra = {}
    if teacher:
        extra = {"teacher_image": F.normalize(torch.randn(n, dim, generator=g), dim=-1).half(),
                 "teacher_text": F.normalize(torch.randn(n, dim, generator=g), dim=-1).half()}
    return v, t, torch.tensor(s).requires_grad_(), extra


def step(loss, v, t, s, extra) -> None:
    for x in (v, t, s):
        x.grad = None
    loss(v, t, s, **extra)["loss"].backward()


def time_all(n: int, dim: int, repeats: int) -> dict[str, list[float]]:
    losses = {name: CASES[name][0]() for name in CASES}
    data = {name: inputs(name, n, dim) for name in CASES}
    for _ in range(2):
        for name in CASES:
            step(losses[name], *data[name])
    times = {name: [] for name in CASES}
    for _ in range(repeats):
        for name in CASES:  # alternate: every round runs every loss once
            tick = time.perf_counter()
            step(losses[name], *data[name])
            times[name].append(time.perf_counter() - tick)
    return times


def peak_memory_mib(name: str, n: int, dim: int, threads: int) -> float:
    """Peak extra RSS of one forward + backward, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--memory-of", name, "--sizes", str(n), "--dim", str(dim),
                          "--threads", str(threads)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(name: str, n: int, dim: int) -> None:
    loss, data = CASES[name][0](), inputs(name, n, dim)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status_kib("VmRSS")
    step(loss, *data)
    print((status_kib("VmHWM") - before) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        memory_child(args.memory_of, args.sizes[0], args.dim)
        return
    print(f"torch {torch.__version__}, {args.threads} threads, float32 CPU, d = {args.dim}, "
          f"median of {args.repeats} alternating rounds after 2 warm-up calls")
    for n in args.sizes:
        times = time_all(n, args.dim, args.repeats)
        clip = statistics.median(times["clip"])
        print(f"\nN = {n}   (one N x N float32 matrix = {n * n * 4 / 2**20:.0f} MiB)")
        print(f"{'loss':<20} {'fwd+bwd ms':>11} {'min..max ms':>16} {'ratio':>7} {'target':>8} {'peak MiB':>9}")
        for name in CASES:
            median = statistics.median(times[name])
            target = CASES[name][4]
            verdict = "" if target is None else f"<= {target}x " + ("ok" if median / clip <= target else "OVER")
            memory = peak_memory_mib(name, n, args.dim, args.threads)
            spread = f"{min(times[name]) * 1e3:.0f}..{max(times[name]) * 1e3:.0f}"
            print(f"{name:<20} {median * 1e3:>11.1f} {spread:>16} {median / clip:>6.2f}x {verdict:>11} {memory:>9.0f}")


if __name__ == "__main__":
    main()
