"""Benchmark: batched Sinkhorn of cot2align_core.ot against the alternatives.

    .venv/bin/python benchmarks/sinkhorn.py [--quick] [--device cpu|cuda] [--out PATH]

The same OT problems (costs between random token states, the default cosine cost and eps),
solved by:

- ``cot2align``: :func:`cot2align_core.ot.sinkhorn` (batched, log-domain with absorption,
  envelope gradient);
- ``pot_loop``: POT's ``ot.solve(..., method="sinkhorn_log", grad="envelope")`` in a Python
  loop over the problems, each on its unpadded sub-problem;
- ``pot_batch``: POT's batched ``ot.batch.solve_batch(..., method="log_sinkhorn",
  grad="detach")`` (its memory-safe mode; its default ``grad="envelope"`` keeps every
  iteration's graph), with the envelope value ``sum(plan.detach() * C)`` formed by hand for the
  backward;
- ``authors_loop``: what the released CoT2Align code does: plain-domain Sinkhorn,
  ``K = exp(-C/eps)``, a fixed number of iterations, a Python loop over the examples,
  gradient by autodiff through the iterations.

Every method runs the same number of iterations (tol = 0: no early stop), forward alone and
forward + backward (gradient of the summed transport cost with respect to the cost matrices).
Reported: median time per call over several repeats after a warm-up, the ratio to
``cot2align``, peak memory of one forward + backward (CUDA: ``max_memory_allocated``; CPU: the
peak-RSS increase of a fresh subprocess running only that method), and the fraction of the
machine's memory bandwidth (measured by a large tensor copy in the same run) reached under the
model "one iteration reads the ``n x m`` kernel twice, once per half-iteration" (float32) on
the unpadded problems (the useful work; batched methods may read padding too). A second
table runs the methods that can stop early to the default tolerance.

On the shared 2-core CPU machines torch is pinned to one thread by default (``--threads``):
with two OpenMP threads and other processes on the cores, a parallel region waits for a
descheduled thread and single calls take milliseconds instead of microseconds, at random.
Results go to ``benchmarks/results/sinkhorn.json`` (git-ignored) and a table is printed.
``--quick`` (about 20 s): fewer rounds, no memory probes, and POT's batched solver (seconds per
call on the large problem) on the small problem only; the full run takes about 1.5 min.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cot2align_core.ot import DEFAULT_EPS, DEFAULT_TOL, cosine_cost, sinkhorn  # noqa: E402

METHODS = ("cot2align", "pot_loop", "pot_batch", "authors_loop")


# ------------------------------------------------------------------------------------------
# Problems
# ------------------------------------------------------------------------------------------


def make_problem(name: str, device: str, seed: int = 0):
    """Padded costs [B, N, M] and 0/1 weights: the cosine cost between the states of aligned
    sequences (the teacher's tokens are noisy copies of the student's, each student token
    covered by one or more teacher tokens, in order: another tokenizer's view of the same text),
    so that Sinkhorn needs as many iterations as on real aligned pairs."""
    g = torch.Generator().manual_seed(seed)
    if name == "B32_128x128":
        B, ns, ms = 32, [128] * 32, [128] * 32
    elif name == "B8_ragged512":
        B = 8
        ns = torch.randint(64, 513, (B,), generator=g).tolist()
        ms = [min(512, max(64, int(n * float(torch.empty(()).uniform_(0.8, 1.5, generator=g))))) for n in ns]
        ns[0], ms[1] = 512, 512  # padded to 512 x 512
    elif name == "B192_demo":
        # The demo's OT batch: 32 examples x 6 terms, answers of 2-7 student tokens and
        # rationales of up to 28, the teacher's BPE about half as many tokens.
        B = 192
        ns = torch.randint(2, 29, (B,), generator=g).tolist()
        ms = [min(14, max(2, int(n * float(torch.empty(()).uniform_(0.4, 0.6, generator=g))))) for n in ns]
        ns[0], ms[1] = 28, 14  # padded to 28 x 14
    else:
        raise ValueError(name)
    N, M, d = max(ns), max(ms), 64
    shared = 0.5 * torch.randn(d, generator=g)  # hidden states share a direction (anisotropy)
    x = torch.randn(B, N, d, generator=g) + shared
    y = torch.randn(B, M, d, generator=g) + shared
    for k in range(B):
        src = (torch.arange(ms[k]) * ns[k]) // ms[k]  # teacher token j encodes student token src[j]
        y[k, : ms[k]] = x[k, src] + 0.3 * torch.randn(ms[k], d, generator=g)
    C = cosine_cost(x, y)
    a = torch.zeros(B, N)
    b = torch.zeros(B, M)
    for k in range(B):
        a[k, : ns[k]] = 1
        b[k, : ms[k]] = 1
    return C.to(device), a.to(device), b.to(device), ns, ms


# ------------------------------------------------------------------------------------------
# Methods: each returns a callable (backward: bool) -> values [B]
# ------------------------------------------------------------------------------------------


def method_fn(method: str, C, a, b, ns, ms, eps: float, iters: int, tol: float):
    import ot as pot

    B = C.shape[0]
    an = a / a.sum(-1, keepdim=True)
    bn = b / b.sum(-1, keepdim=True)
    # POT stops when the L2 norm of one marginal's error is below its tolerance (the other
    # marginal is exact after its last update); ||.||_1 <= sqrt(len) ||.||_2, so this tolerance
    # guarantees cot2align's criterion, an L1 error <= tol.
    pot_tol = tol / math.sqrt(max(C.shape[1], C.shape[2]))

    if method == "cot2align":

        def run(backward: bool):
            Cg = C.detach().requires_grad_(backward)
            res = sinkhorn(Cg, a, b, eps=eps, max_iter=iters, tol=tol)
            if backward:
                res.value.sum().backward()
            return res.value.detach(), res.n_iter, [res.plan[k, : ns[k], : ms[k]] for k in range(B)]

    elif method == "pot_loop":

        def run(backward: bool):
            vals, its, plans = [], [], []
            for k in range(B):
                Ck = C[k, : ns[k], : ms[k]].detach().requires_grad_(backward)
                r = pot.solve(
                    Ck, an[k, : ns[k]], bn[k, : ms[k]], reg=eps, method="sinkhorn_log",
                    max_iter=iters, tol=pot_tol, grad="envelope" if backward else "detach",
                )
                # r.value is the regularised objective with the envelope gradient (the plan).
                if backward:
                    r.value.backward()
                vals.append(r.value_linear.detach())
                its.append(r.log.get("niter", iters) if isinstance(r.log, dict) else iters)
                plans.append(r.plan.detach())
            return torch.stack(vals), its, plans

    elif method == "pot_batch":

        def run(backward: bool):
            Cg = C.detach().requires_grad_(backward)
            r = pot.batch.solve_batch(
                Cg, reg=eps, a=an, b=bn, max_iter=iters, tol=pot_tol, method="log_sinkhorn",
                grad="detach",
            )
            value = (r.plan.detach() * Cg).sum((-2, -1))  # envelope value, by hand
            if backward:
                value.sum().backward()
            return value.detach(), r.log["n_iter"], [r.plan[k, : ns[k], : ms[k]] for k in range(B)]

    elif method == "authors_loop":

        def run(backward: bool):
            vals, plans = [], []
            for k in range(B):
                Ck = C[k, : ns[k], : ms[k]].detach().requires_grad_(backward)
                with torch.set_grad_enabled(backward):
                    K = torch.exp(-Ck / eps)
                    ak, bk = an[k, : ns[k]], bn[k, : ms[k]]
                    u = torch.ones_like(ak)
                    v = torch.ones_like(bk)
                    for _ in range(iters):
                        u = ak / (K @ v)
                        v = bk / (K.T @ u)
                    T = u[:, None] * K * v[None, :]
                    val = (T * Ck).sum()
                if backward:
                    val.backward()
                vals.append(val.detach())
                plans.append(T.detach())
            return torch.stack(vals), iters, plans

    else:
        raise ValueError(method)
    return run


# ------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict, device: str, repeats: int, budget_s: float) -> dict:
    """Median seconds per call of each function, after a warm-up call of each.

    The functions are timed in turns (one call of each per round), so that the load of other
    processes on a shared machine falls on all of them alike; fewer rounds when calls are slow.
    """
    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        sync(device)
        first[name] = time.perf_counter() - t0
    rounds = max(2, min(repeats, int(budget_s / max(sum(first.values()), 1e-6))))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), len(t)) for name, t in times.items()}


def copy_bandwidth(device: str, mbytes: int = 256) -> float:
    """Bytes/s of a large tensor copy (read + write), the machine's practical bandwidth."""
    n = mbytes * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def memory_probe(method, problem, device, eps, iters, tol, threads) -> float:
    """Peak memory (MiB) of one forward + backward."""
    if device == "cuda":
        C, a, b, ns, ms = make_problem(problem, device)
        run = method_fn(method, C, a, b, ns, ms, eps, iters, tol)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(True)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # CPU: a fresh process, so that the peak RSS is this method's alone.
    cmd = [sys.executable, __file__, "--_probe", method, problem, "--eps", str(eps),
           "--iters", str(iters), "--tol", str(tol), "--threads", str(threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _probe_main(method, problem, eps, iters, tol) -> None:
    """Child process: peak resident memory above the baseline during one forward + backward.

    A thread samples the resident set size every 0.2 ms while the method runs (torch kernels
    release the GIL; the switch interval is shortened for the Python-level loops). The parent
    sets MALLOC_MMAP_THRESHOLD_ so that freed blocks go back to the OS and the RSS follows the
    live allocations.
    """
    import threading

    C, a, b, ns, ms = make_problem(problem, "cpu")
    run = method_fn(method, C, a, b, ns, ms, eps, iters, tol)
    run(True)  # warm-up: lazy initialisations are not the method's memory
    sys.setswitchinterval(1e-4)
    base = _rss_bytes()
    peak, stop = [base], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(2e-4)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    run(True)
    stop.set()
    t.join()
    peak[0] = max(peak[0], _rss_bytes())
    print((peak[0] - base) / 2**20)


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="fewer rounds, no memory probes, POT's batched solver on the small problem only")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sinkhorn.json")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see the module docstring)")
    p.add_argument("--eps", type=float, default=DEFAULT_EPS)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--tol", type=float, default=0.0)
    p.add_argument("--_probe", nargs=2, metavar=("METHOD", "PROBLEM"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args._probe:
        _probe_main(*args._probe, args.eps, args.iters, args.tol)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")

    import ot

    device, eps, iters = args.device, args.eps, args.iters
    repeats = 3 if args.quick else 7
    budget = 1.5 if args.quick else 6.0  # seconds of timed calls per (method, problem, mode)
    problems = ["B32_128x128", "B8_ragged512", "B192_demo"]
    started = time.perf_counter()
    bw = copy_bandwidth(device)
    results = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "pot": ot.__version__,
        "threads": torch.get_num_threads(),
        "eps": eps,
        "iterations": iters,
        "tol_runs": DEFAULT_TOL,
        "copy_bandwidth_GBps": bw / 1e9,
        "quick": args.quick,
        "rows": [],
    }

    for tol in (0.0, DEFAULT_TOL):
        for problem in problems:
            C, a, b, ns, ms = make_problem(problem, device)
            methods = [
                mth for mth in METHODS
                if not (tol > 0 and mth == "authors_loop")  # no stopping rule in the released code
                and not (args.quick and problem == "B8_ragged512" and mth == "pot_batch")  # slowest
            ]
            runs = {mth: method_fn(mth, C, a, b, ns, ms, eps, iters, tol) for mth in methods}
            an, bn = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
            info = {}
            for mth, run in runs.items():
                values, n_iter, plans = run(False)
                if mth == "pot_loop" and tol > 0:  # ot.solve does not report it; ot.sinkhorn does
                    n_iter = [
                        ot.sinkhorn(an[k, : ns[k]], bn[k, : ms[k]], C[k, : ns[k], : ms[k]], eps,
                                    method="sinkhorn_log", numItermax=iters,
                                    stopThr=tol / math.sqrt(max(C.shape[1], C.shape[2])),
                                    log=True, warn=False)[1]["niter"] + 1
                        for k in range(len(ns))
                    ]
                if isinstance(n_iter, torch.Tensor):
                    its = float(n_iter.float().mean())
                elif isinstance(n_iter, list):
                    its = float(sum(int(i) for i in n_iter) / len(n_iter))
                else:
                    its = float(n_iter)
                if tol == 0:
                    its = float(iters)
                elif mth == "pot_batch":
                    its += 1  # POT's counter is the 0-based index of the last iteration
                # L1 marginal error of the returned plans, the criterion of cot2align's tol.
                merr = max(
                    float((P.sum(1) - an[k, : ns[k]]).abs().sum() + (P.sum(0) - bn[k, : ms[k]]).abs().sum())
                    for k, P in enumerate(plans)
                )
                info[mth] = (values, its, merr)
            fwd = time_interleaved({m: (lambda r=r: r(False)) for m, r in runs.items()}, device, repeats, budget)
            bwd = time_interleaved({m: (lambda r=r: r(True)) for m, r in runs.items()}, device, repeats, budget)
            for mth in methods:
                values, its, merr = info[mth]
                elems = sum(n * m for n, m in zip(ns, ms))  # the useful (unpadded) entries
                gbps = 2 * elems * 4 * its / fwd[mth][0] / 1e9
                row = {
                    "problem": problem, "method": mth, "tol": tol,
                    "fwd_ms": fwd[mth][0] * 1e3, "fwd_bwd_ms": bwd[mth][0] * 1e3,
                    "rounds": [fwd[mth][1], bwd[mth][1]], "mean_iterations": its,
                    "max_marginal_error_l1": merr, "matrix_elements": elems,
                    "model_GBps": gbps, "bandwidth_fraction": gbps * 1e9 / bw,
                    "values": values.float().cpu().tolist(),
                }
                if tol == 0 and not args.quick:
                    row["peak_mem_MiB"] = memory_probe(mth, problem, device, eps, iters, tol, args.threads)
                results["rows"].append(row)
                print(f"  {problem:14s} {mth:13s} tol={tol:g}: fwd {row['fwd_ms']:.1f} ms, "
                      f"fwd+bwd {row['fwd_bwd_ms']:.1f} ms", flush=True)

    # Agreement of the values with cot2align's (same iterations: same numbers, up to the
    # iteration scheme and precision).
    for r in results["rows"]:
        ref = next(x for x in results["rows"] if x["problem"] == r["problem"] and x["tol"] == r["tol"] and x["method"] == "cot2align")
        r["max_abs_value_diff_vs_cot2align"] = max(abs(u - v) for u, v in zip(r["values"], ref["values"]))
        r["fwd_ratio_vs_cot2align"] = r["fwd_ms"] / ref["fwd_ms"]
        r["fwd_bwd_ratio_vs_cot2align"] = r["fwd_bwd_ms"] / ref["fwd_bwd_ms"]
    for r in results["rows"]:
        del r["values"]
    results["wall_s"] = time.perf_counter() - started

    print()
    print(f"device {device} ({results['device_name']}), torch {torch.__version__} ({results['threads']} thread(s)), "
          f"POT {ot.__version__}, eps {eps}, copy bandwidth {bw / 1e9:.1f} GB/s")
    head = (f"{'problem':14s} {'method':13s} {'tol':>6s} {'iters':>6s} {'fwd ms':>9s} {'x':>6s} "
            f"{'fwd+bwd ms':>11s} {'x':>6s} {'peak MiB':>9s} {'GB/s':>6s} {'%bw':>5s} {'|dv|':>8s} {'marg.err':>8s}")
    print(head)
    print("-" * len(head))
    for r in results["rows"]:
        mem = f"{r['peak_mem_MiB']:9.1f}" if "peak_mem_MiB" in r else f"{'':9s}"
        print(f"{r['problem']:14s} {r['method']:13s} {r['tol']:6g} {r['mean_iterations']:6.0f} "
              f"{r['fwd_ms']:9.1f} {r['fwd_ratio_vs_cot2align']:6.1f} {r['fwd_bwd_ms']:11.1f} "
              f"{r['fwd_bwd_ratio_vs_cot2align']:6.1f} {mem} {r['model_GBps']:6.1f} "
              f"{100 * r['bandwidth_fraction']:5.0f} {r['max_abs_value_diff_vs_cot2align']:8.1e} "
              f"{r['max_marginal_error_l1']:8.1e}")
    print("x: time / cot2align's time (higher = cot2align faster). GB/s: 2 reads of the n x m "
          "float32 unpadded kernel per iteration, %bw: of the copy "
          "bandwidth. |dv|: max |value - cot2align's value|. marg.err: max L1 marginal error of "
          "the returned plans (POT's L2 stopping tolerance is set to tol / sqrt(max(n, m)), which "
          "implies an L1 error <= tol). tol rows keep the --iters cap: problems that need more stop "
          "there.")
    print(f"total {results['wall_s']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
