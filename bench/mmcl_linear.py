"""The linear experiment of Nakada et al. (AISTATS 2023, section 5.1): does unpaired data help MMCL?

Data: U1 (d1 x r), U2 (d2 x r) Haar-random orthonormal; z ~ N(0, I_r); x = U1 z + 0.3 e, y = U2 z + 0.3 e'.
n = 300 clean pairs, an unpaired pool of N images and N texts, 10,000 test pairs. Two kinds of pool:
  hidden       (the authors' notebook, nswa17/MMCL `aistats_first_experiment.ipynb`): the pool is drawn
               as pairs whose correspondence is hidden, and each minibatch holds m images and THEIR m
               texts (the notebook slices both arrays with the same indices); we shuffle the texts
               within the batch so no position carries the pairing;
  independent  images and texts from independent latents: no image has a partner anywhere in the pool,
               as for a pool of images whose captions were rejected and captions of other images. Linear encoders without bias (G1: r x d1, G2: r x d2), cosine
similarity, tau = 1 fixed, AdamW lr 2e-3, batch 50: `paired_epochs` of ClipLoss on the pairs, then
`unpaired_epochs` of UnpairedLoss (top-K pseudo-pairing, K = m) on the pool, starting from a copy of
the paired-stage model and its AdamW state (trained once per seed, shared by every N), as the notebook
continues its optimiser.

Metrics: top-1 cross-modal retrieval on the test pairs (mean of image->text and text->image) and the
sin-theta distance ||sin Theta(row space of G, U)||_F = sqrt(max(0, r - ||U^T Q||_F^2)), mean of both
modalities (0: the true subspace, sqrt(r) = 3.16: orthogonal to it).

Closed form (the linear loss's minimiser): the rank-r SVD of the contrastive cross-covariance
    S = 1/n sum_i x_i y_i^T - 1/(n(n-1)) sum_{i != j} x_i y_j^T
      = 1/n X^T Y - 1/(n(n-1)) [(X^T 1)(Y^T 1)^T - X^T Y]          (beta_ii = 1, beta_ij = 1/(n-1)),
S ~ A diag(s) B^T, gives G1 = A^T, G2 = B^T. Row 1: on the pairs alone; rows per N: on the pairs plus
the pool pseudo-paired once by the paired-stage model (shuffled batches of 50, the K = 50 largest
similarities of each, as UnpairedLoss picks them).

    .venv/bin/python bench/mmcl_linear.py [--seeds 5] [--sizes 500 1000 ... 5000] [--test 10000]
        [--paired-epochs 100] [--unpaired-epochs 100] [--pool hidden|independent] [--json PATH] [--threads 1]
    .venv/bin/python bench/mmcl_linear.py --plot OUT.png RUN.json [RUN.json ...]   # the figure of earlier runs
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train.losses import ClipLoss  # noqa: E402
from train.losses.mmcl import UnpairedLoss  # noqa: E402

D1, D2, R, NOISE = 40, 39, 10, 0.3
N_PAIRS, BATCH, LR = 300, 50, 2e-3
SIZES = list(range(500, 5001, 500))
PAPER_PAIRED = "0.37-0.43"  # the paired stage never sees the pool: one range for every N


def paper_unpaired(n: int) -> str:
    return "0.45" if n == 500 else "~0.60" if n >= 2500 else "-"


def haar(d: int, r: int, g: torch.Generator) -> torch.Tensor:
    """d x r with Haar-random orthonormal columns."""
    q, rr = torch.linalg.qr(torch.randn(d, r, generator=g))
    return q * torch.sign(torch.diagonal(rr))  # QR's own sign convention would bias Q; this makes it Haar


def make_data(seed: int, n_pairs: int = N_PAIRS, n_pool: int = 5000, n_test: int = 10_000, d1: int = D1, d2: int = D2,
              r: int = R, noise: float = NOISE, pool: str = "independent") -> dict[str, torch.Tensor]:
    """The subspaces, the clean pairs, the test pairs and the unpaired pool (the first N of it is the pool of size N)."""
    g = torch.Generator().manual_seed(seed)
    u1, u2 = haar(d1, r, g), haar(d2, r, g)

    def images(z):
        return z @ u1.T + noise * torch.randn(len(z), d1, generator=g)

    def texts(z):
        return z @ u2.T + noise * torch.randn(len(z), d2, generator=g)

    z, z_test = torch.randn(n_pairs, r, generator=g), torch.randn(n_test, r, generator=g)
    x, y, test_x, test_y = images(z), texts(z), images(z_test), texts(z_test)
    z_pool = torch.randn(n_pool, r, generator=g)
    # hidden: pool_x[i] and pool_y[i] share a latent (the pairing is never given to the loss);
    # independent: fresh latents for the texts, so no image has a partner among them
    pool_x, pool_y = images(z_pool), texts(z_pool if pool == "hidden" else torch.randn(n_pool, r, generator=g))
    return {"u1": u1, "u2": u2, "x": x, "y": y, "test_x": test_x, "test_y": test_y, "pool_x": pool_x, "pool_y": pool_y}


def init_encoders(seed: int, d1: int = D1, d2: int = D2, r: int = R) -> nn.ModuleList:
    torch.manual_seed(seed)
    return nn.ModuleList([nn.Linear(d1, r, bias=False), nn.Linear(d2, r, bias=False)])


def embed(encoders: nn.ModuleList, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.normalize(encoders[0](x), dim=-1), F.normalize(encoders[1](y), dim=-1)


def train_paired(encoders: nn.ModuleList, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int,
                 batch: int = BATCH, lr: float = LR) -> tuple[nn.ModuleList, torch.optim.Optimizer]:
    """CLIP loss at logit scale 1 (tau = 1, fixed) on shuffled minibatches; trains `encoders` in place."""
    loss_fn, scale = ClipLoss(), torch.tensor(1.0)
    opt = torch.optim.AdamW(encoders.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            loss = loss_fn(*embed(encoders, x[idx], y[idx]), scale)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return encoders, opt


def pool_batches(n: int, pool: str, g: torch.Generator, batch: int = BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(image indices, text indices) of one epoch's minibatches. hidden: a batch's texts are its images'
    partners in a shuffled order; independent: images and texts shuffled apart."""
    images = torch.randperm(n, generator=g).split(batch)
    if pool == "hidden":
        return [(i, i[torch.randperm(len(i), generator=g)]) for i in images]
    return list(zip(images, torch.randperm(n, generator=g).split(batch)))


def train_unpaired(encoders: nn.ModuleList, opt: torch.optim.Optimizer, pool_x: torch.Tensor, pool_y: torch.Tensor,
                   epochs: int, seed: int, pool: str) -> nn.ModuleList:
    """UnpairedLoss (pairs=None: the K = m largest similarities are the positives) on m images and m texts
    a step; trains `encoders` in place, `opt` (the paired stage's AdamW, over these encoders) continued."""
    loss_fn, scale = UnpairedLoss(), torch.tensor(1.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for i, j in pool_batches(len(pool_x), pool, g):
            loss = loss_fn(*embed(encoders, pool_x[i], pool_y[j]), scale)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return encoders


@torch.no_grad()
def top1(v: torch.Tensor, t: torch.Tensor, block: int = 1000) -> float:
    """Mean of image->text and text->image top-1 accuracy, row i's partner being column i; in blocks of rows
    so the n x n similarity matrix is never held whole."""
    n, hits = len(v), 0
    for a, b in ((v, t), (t, v)):
        for s in range(0, n, block):
            hits += ((a[s:s + block] @ b.T).argmax(1) == torch.arange(s, min(s + block, n))).sum().item()
    return hits / (2 * n)


def sin_theta(g: torch.Tensor, u: torch.Tensor) -> float:
    """||sin Theta(Q, U)||_F with Q an orthonormal basis of the row space of g (r x d), U orthonormal (d x r)."""
    # ||(I - QQ^T) U||_F, the residual itself: r - ||Q^T U||^2 cancels to float32's rounding (sqrt 1e-7 = 3e-4)
    q, u = torch.linalg.qr(g.T.double()).Q, u.double()
    return (u - q @ (q.T @ u)).norm().item()


def evaluate(g1: torch.Tensor, g2: torch.Tensor, data: dict) -> dict[str, float]:
    """Retrieval on the test pairs and the mean sin-theta of linear encoders given as weight matrices."""
    v, t = F.normalize(data["test_x"] @ g1.T, dim=-1), F.normalize(data["test_y"] @ g2.T, dim=-1)
    return {"top1": top1(v, t), "sin_theta": (sin_theta(g1, data["u1"]) + sin_theta(g2, data["u2"])) / 2}


def weights(encoders: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor]:
    return encoders[0].weight.detach(), encoders[1].weight.detach()


def closed_form(x: torch.Tensor, y: torch.Tensor, r: int = R) -> tuple[torch.Tensor, torch.Tensor]:
    """(G1, G2) = (A^T, B^T) from the rank-r SVD of S = 1/n X^T Y - 1/(n(n-1)) [(X^T 1)(Y^T 1)^T - X^T Y]."""
    x, y, n = x.double(), y.double(), len(x)
    xy = x.T @ y
    s = xy / n - (torch.outer(x.sum(0), y.sum(0)) - xy) / (n * (n - 1))
    a, _, bh = torch.linalg.svd(s)
    return a[:, :r].T.float(), bh[:r].float()


@torch.no_grad()
def pseudo_pairs(encoders: nn.ModuleList, pool_x: torch.Tensor, pool_y: torch.Tensor, seed: int,
                 pool: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool paired once by the model: shuffled batches of m, each giving its K = m largest similarities."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for i, j in pool_batches(len(pool_x), pool, g):
        v, t = embed(encoders, pool_x[i], pool_y[j])
        rows, cols = UnpairedLoss.positives(v @ t.T).nonzero(as_tuple=True)
        xs.append(pool_x[i][rows])
        ys.append(pool_y[j][cols])
    return torch.cat(xs), torch.cat(ys)


def continued(encoders: nn.ModuleList, opt: torch.optim.Optimizer) -> tuple[nn.ModuleList, torch.optim.Optimizer]:
    """A copy of the model with a copy of its optimiser state, bound to the copy's parameters."""
    model = copy.deepcopy(encoders)
    new = torch.optim.AdamW(model.parameters(), lr=opt.param_groups[0]["lr"])
    new.load_state_dict(copy.deepcopy(opt.state_dict()))
    return model, new


def run_seed(seed: int, sizes: list[int], n_test: int, paired_epochs: int, unpaired_epochs: int,
             pool: str = "hidden") -> dict:
    """Every number of one seed: paired stage, closed forms, and for each N the unpaired stage."""
    data = make_data(seed, n_pool=max(sizes), n_test=n_test, pool=pool)
    paired, opt = train_paired(init_encoders(seed), data["x"], data["y"], paired_epochs, seed)
    out = {"paired": evaluate(*weights(paired), data), "closed_form": evaluate(*closed_form(data["x"], data["y"]), data),
           "by_size": {}}
    for n in sizes:
        pool_x, pool_y = data["pool_x"][:n], data["pool_y"][:n]
        model = train_unpaired(*continued(paired, opt), pool_x, pool_y, unpaired_epochs, seed * 100_003 + n, pool)
        px, py = pseudo_pairs(paired, pool_x, pool_y, seed * 100_003 + n, pool)
        out["by_size"][n] = {"unpaired": evaluate(*weights(model), data),
                             "closed_form_pseudo": evaluate(*closed_form(torch.cat([data["x"], px]),
                                                                         torch.cat([data["y"], py])), data)}
    return out


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0  # sample std over seeds
    return f"{statistics.fmean(values):.3f} +- {std:.3f}"


def summarise(results: dict[int, dict], sizes: list[int]) -> None:
    seeds = list(results)
    print(f"\n{'N':>5}  {'paired top1':>15}  {'+unpaired top1':>15}  {'sin paired':>15}  {'sin +unpaired':>15}  "
          f"{'paper paired':>12}  {'paper +unpaired':>15}")
    paired_top = [results[s]["paired"]["top1"] for s in seeds]
    paired_sin = [results[s]["paired"]["sin_theta"] for s in seeds]
    for n in sizes:
        top = [results[s]["by_size"][n]["unpaired"]["top1"] for s in seeds]
        sin = [results[s]["by_size"][n]["unpaired"]["sin_theta"] for s in seeds]
        print(f"{n:>5}  {mean_std(paired_top):>15}  {mean_std(top):>15}  {mean_std(paired_sin):>15}  {mean_std(sin):>15}  "
              f"{PAPER_PAIRED:>12}  {paper_unpaired(n):>15}")
    print("\nclosed form (rank-r SVD of the contrastive cross-covariance)")
    print(f"{'data':>28}  {'top1':>15}  {'sin theta':>15}")
    cf = [results[s]["closed_form"] for s in seeds]
    print(f"{'pairs only':>28}  {mean_std([c['top1'] for c in cf]):>15}  {mean_std([c['sin_theta'] for c in cf]):>15}")
    for n in sizes:
        cf = [results[s]["by_size"][n]["closed_form_pseudo"] for s in seeds]
        label = f"pairs + {n} pseudo-paired"
        print(f"{label:>28}  {mean_std([c['top1'] for c in cf]):>15}  {mean_std([c['sin_theta'] for c in cf]):>15}")


PAPER_NOTEBOOK = {500: 0.448, 1000: 0.5207, 1500: 0.5665, 2000: 0.5765, 2500: 0.5924, 3000: 0.5865, 3500: 0.5958,
                  4000: 0.6009, 4500: 0.5937, 5000: 0.5962}  # the authors' notebook output (one seed)


def plot(out: str, runs: list[str]) -> None:
    """Top-1 against N for each --json file given (mean +- std over seeds), the paper's curve beside them."""
    from curate.report import figure, png

    fig = figure(width=5.5, height=3.6)
    ax = fig.subplots()
    for path in runs:
        run = json.loads(Path(path).read_text())
        results, pool = run["results"], run["args"].get("pool", "independent")
        sizes = sorted(int(n) for n in next(iter(results.values()))["by_size"])
        top = [[r["by_size"][str(n)]["unpaired"]["top1"] for r in results.values()] for n in sizes]
        ax.errorbar(sizes, [statistics.fmean(t) for t in top], [statistics.pstdev(t) for t in top], capsize=2,
                    label=f"+ unpaired, {pool} pool ({len(results)} seeds)")
    paired = [r["paired"]["top1"] for r in results.values()]
    ax.axhline(statistics.fmean(paired), color="grey", ls="--", label="paired only (ours)")
    ax.plot(list(PAPER_NOTEBOOK), list(PAPER_NOTEBOOK.values()), "k:", marker="x", label="paper (authors' notebook)")
    ax.set_xlabel("unpaired pool size N")
    ax.set_ylabel("top-1 retrieval, 10k test pairs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    Path(out).write_bytes(png(fig))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. seeds-1; seed s sets the data and the init")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="unpaired pool sizes N")
    parser.add_argument("--test", type=int, default=10_000, help="test pairs")
    parser.add_argument("--paired-epochs", type=int, default=100)
    parser.add_argument("--unpaired-epochs", type=int, default=100)
    parser.add_argument("--pool", choices=["hidden", "independent"], default="hidden",
                        help="hidden: the notebook's pool (each batch holds its images' partners, unlabelled); "
                             "independent: no partner anywhere in the pool")
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; the matrices are tiny, so a second thread only adds sync (5x slower under load)")
    parser.add_argument("--plot", nargs="+", metavar=("PNG", "JSON"),
                        help="only draw PNG from the --json files of earlier runs, then exit")
    args = parser.parse_args()
    if args.plot:
        return plot(args.plot[0], args.plot[1:])
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = {}
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        results[seed] = run_seed(seed, args.sizes, args.test, args.paired_epochs, args.unpaired_epochs, args.pool)
        print(f"seed {seed}: paired top1 {results[seed]['paired']['top1']:.3f}, "
              f"N={args.sizes[-1]} top1 {results[seed]['by_size'][args.sizes[-1]]['unpaired']['top1']:.3f} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    summarise(results, args.sizes)
    total = time.perf_counter() - started
    print(f"\ntotal time {total:.1f} s (pool {args.pool}, {args.seeds} seeds, {len(args.sizes)} sizes, {args.paired_epochs} + "
          f"{args.unpaired_epochs} epochs, {args.test} test pairs)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "seconds": total, "results": results}, indent=1))


if __name__ == "__main__":
    main()
