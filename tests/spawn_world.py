"""Starting a world of gloo worker processes on the loopback interface, for the multi-process
tests. Each worker is ``python SCRIPT --worker RANK WORLD STORE OUT_DIR *args`` and saves its
results to OUT_DIR/rank{RANK}.pt; a failed or hung worker's output is returned for the report."""
import os
import subprocess
import sys
import tempfile

import torch


def worker_env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    return env


def spawn_world(script: str, world: int, args, timeout_s: float, prefix: str):
    """Returns the list of the ranks' saved results, or a string with the failed workers' output."""
    tmp = tempfile.mkdtemp(prefix=f"{prefix}{world}-")
    procs = [
        subprocess.Popen([sys.executable, os.path.abspath(script), "--worker", str(rank), str(world),
                          os.path.join(tmp, "store"), tmp, *args],
                         env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(world)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout_s)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.kill()
            logs.append(p.communicate()[0] + "\n[timed out]")
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        return "\n".join(f"--- rank {r} (exit {procs[r].returncode}):\n{logs[r][-3000:]}" for r in failed)
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]
