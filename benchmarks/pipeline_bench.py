"""Layer pipeline throughput: stage-1 training steps per second, 1 process vs R processes.

    python benchmarks/pipeline_bench.py                      # CPU: 1 process (1 and R threads) vs R x 1 thread
    python benchmarks/pipeline_bench.py --ranks 2 --repeats 3 --out results.json -- --width 1000 --layers 4
    python benchmarks/pipeline_bench.py --ranks 3 -- --method symba --model cnn --epochs 2 --device cpu  # conv blocks

Every measurement is an ``ffkern train --pipeline`` run in fresh processes (the one-process run
without torchrun, the R-process one under torchrun) and reads ``pipeline.stage1_s`` from its
metrics: the time from a barrier that starts all ranks together until the last rank has
processed its last batch. That time covers the training steps and the per-epoch validation
passes (and the per-epoch Fisher pass of the probe, which the default arguments turn off with
--no-probe: they measure training), the same work in every configuration (the results are equal,
see tests/test_pipeline.py);
process start, data loading and stage 2 are outside it. A step is one training batch through all
layers. The median of ``--repeats`` runs is reported.

The CPU figures only mean something when the machine has at least R idle cores: on a shared
machine other jobs take cores from the ranks and from the one-process run alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

DEFAULT_TRAIN_ARGS = ["--method", "cff", "--model", "mlp", "--width", "1000", "--layers", "4", "--batch-size", "256",
                      "--epochs", "3", "--head-epochs", "1", "--device", "cpu", "--no-probe"]


def _run(cmd, env) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "m.json")
        proc = subprocess.run([*cmd, "--metrics-out", out, "--no-progress"], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout:\n{proc.stdout[-6000:]}"
                             f"\n--- stderr:\n{proc.stderr[-10000:]}")
        with open(out) as f:
            return json.load(f)


_CONTROL = """
import time, torch
torch.set_num_threads(1)
a, b = torch.randn(512, 1000), torch.randn(1000, 1000)
for _ in range(5): a @ b
t = time.perf_counter()
for _ in range(300): a @ b
print(time.perf_counter() - t)
"""


def free_cores(ranks: int) -> float:
    """How many cores the machine gives ``ranks`` concurrent one-thread processes right now:
    ranks * (time of one matmul loop alone) / (its time with ranks copies running at once).
    A pipeline of R ranks cannot beat this factor, so it is printed next to the speed-up."""
    def loop_times(n):
        procs = [subprocess.Popen([sys.executable, "-c", _CONTROL], stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return [float(p.communicate()[0]) for p in procs]
    alone = statistics.median(loop_times(1)[0] for _ in range(2))
    together = statistics.median(loop_times(ranks))
    return ranks * alone / together


def measure(ranks: int, threads: int, train_args, repeats: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    train = ["-m", "ffkern", "train", "--pipeline", *train_args, "--threads", str(threads)]
    if ranks == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *train]
    runs = [_run(cmd, env) for _ in range(repeats)]
    times = [m["pipeline"]["stage1_s"] for m in runs]
    steps = runs[0]["pipeline"]["train_steps"]
    median = statistics.median(times)
    return {"ranks": ranks, "threads_per_rank": threads, "layers_per_rank": runs[0]["pipeline"]["layers_per_rank"],
            "train_steps": steps, "valid_steps": runs[0]["pipeline"]["valid_steps"], "stage1_s": times,
            "steps_per_s": steps / median, "test_accuracy": [m["test_accuracy"] for m in runs],
            "wait_recv_s": [r["wait_recv_s"] for r in runs[0]["pipeline"]["ranks"]],
            "backend": runs[0]["backend"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2, help="R: processes of the pipeline (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; the median is reported (default 3)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("train_args", nargs="*", help="after --: ffkern train options (default: %s)" % " ".join(DEFAULT_TRAIN_ARGS))
    args = p.parse_args(argv)
    if args.ranks < 2 or args.repeats < 1:
        p.error("--ranks must be >= 2 and --repeats >= 1")
    train_args = args.train_args or DEFAULT_TRAIN_ARGS
    configs = [(1, 1), (1, args.ranks), (args.ranks, 1)]  # (processes, threads each)
    results = []
    for ranks, threads in configs:
        r = measure(ranks, threads, train_args, args.repeats)
        results.append(r)
        print(f"{ranks} process(es) x {threads} thread(s), layers {r['layers_per_rank']}: {r['steps_per_s']:.1f} steps/s"
              f" (stage 1 {statistics.median(r['stage1_s']):.2f} s median of {r['stage1_s']},"
              f" {r['train_steps']} steps + {r['valid_steps']} validation batches)", flush=True)
    cores = free_cores(args.ranks)
    print(f"control: {args.ranks} concurrent one-thread matmul processes ran at {cores:.2f}x the rate of one"
          f" (the cores this machine gave {args.ranks} processes during the run)")
    base = results[0]["steps_per_s"]
    for r in results[1:]:
        print(f"  {r['ranks']} x {r['threads_per_rank']}: {r['steps_per_s'] / base:.2f}x the 1-process 1-thread rate")
    if args.out:
        info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "train_args": train_args, "results": results, "free_cores_control": cores}
        with open(args.out, "w") as f:
            json.dump(info, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
