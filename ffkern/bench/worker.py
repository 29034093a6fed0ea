"""The measuring process. ``ffkern bench`` starts one fresh worker per provider (and one for the
ceilings, one for the end-to-end step) and sends it one request at a time, so that:
  - every provider starts from a clean process: its own CUDA context and allocator, no heap
    grown by another provider, compile caches of its own;
  - peak RSS on the CPU is measurable (see ffkern.bench.timing: the worker controls glibc's
    allocator thresholds, which a long-lived parent could not);
  - a crash or an out-of-memory kill ends that worker only; the sweep records why and goes on.

Protocol: one JSON object per line. Requests on stdin; responses on the original stdout, which
the worker keeps for itself (everything else printed, by Python or by C++, goes to stderr).
"""
from __future__ import annotations

import gc
import json
import os
import queue
import subprocess
import sys
import threading
import traceback
from typing import Dict, Optional

# ----------------------------------------------------------------------------- client (parent)

class WorkerDied(RuntimeError):
    pass


class WorkerClient:
    """A worker process seen from the sweep: ``request(dict) -> dict``."""

    def __init__(self, init: Dict, timeout_s: float = 900.0):
        self.proc = subprocess.Popen([sys.executable, "-m", "ffkern.bench.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1)
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.timeout_s = timeout_s
        self.init = self.request(dict(init, op="init"))

    def _read(self):
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def request(self, message: Dict, timeout_s: Optional[float] = None) -> Dict:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise WorkerDied(self._death(f"could not send the request ({exc})")) from exc
        try:
            line = self._lines.get(timeout=timeout_s or self.timeout_s)
        except queue.Empty:
            self.proc.kill()
            self.proc.wait()
            raise WorkerDied(f"no answer within {timeout_s or self.timeout_s:.0f} s: the worker was stopped")
        if line is None:
            raise WorkerDied(self._death("the worker exited"))
        return json.loads(line)

    def _death(self, what: str) -> str:
        code = self.proc.wait()
        if code < 0:
            sig = -code
            hint = " (SIGKILL: most likely the out-of-memory killer)" if sig == 9 else ""
            return f"{what}: killed by signal {sig}{hint}"
        return f"{what} with code {code}"

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- server (worker)

def _oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text.lower() or "can't allocate memory" in text or "not enough memory" in text)


class Server:
    def __init__(self):
        self.device = None
        self.provider = None
        self.settings: Dict = {}

    def init(self, req: Dict) -> Dict:
        import torch

        from .devinfo import device_info
        from .providers import make_provider
        from .timing import TIMING_MALLOC, set_malloc

        self.device = torch.device(req["device"])
        self.settings = req
        set_malloc(*TIMING_MALLOC)  # the same allocator state for every timed call
        torch.set_float32_matmul_precision(req.get("fp32_precision", "highest"))
        if req.get("threads"):
            torch.set_num_threads(int(req["threads"]))
        if self.device.type == "cuda":
            torch.cuda.init()
        out = {"ok": True, "info": device_info(self.device), "unavailable": None}
        if req.get("provider"):
            self.provider = make_provider(req["provider"], compile_backend=req.get("compile_backend", "inductor"),
                                          compile_dynamic=req.get("compile_dynamic", False))
            out["unavailable"] = self.provider.unavailable_reason(self.device)
        return out

    def ceilings(self, req: Dict) -> Dict:
        from .ceilings import measure_ceilings

        return {"ok": True, "ceilings": measure_ceilings(self.device, quick=bool(req.get("quick")))}

    def measure(self, req: Dict) -> Dict:
        from .measure import measure

        return measure(self.provider, self.device, req)

    def e2e(self, req: Dict) -> Dict:
        from .e2e import E2EConfig, run_e2e

        return {"ok": True, "e2e": run_e2e(E2EConfig(**req["config"]), self.device)}

    def handle(self, req: Dict) -> Dict:
        op = req.get("op")
        handler = {"init": self.init, "ceilings": self.ceilings, "measure": self.measure, "e2e": self.e2e}.get(op)
        if handler is None:
            return {"ok": False, "status": "failed", "reason": f"unknown request {op!r}"}
        try:
            answer = handler(req)
        except Exception as exc:  # noqa: BLE001 - reported to the sweep, which records it
            traceback.print_exc(file=sys.stderr)
            status = "skipped" if _oom(exc) else "failed"
            text = str(exc).strip()
            reason = ("out of memory: " if status == "skipped" else "") + \
                f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
            answer = {"ok": False, "status": status, "reason": reason[:500]}
        # After every request, and outside the except block (where a traceback's frames would
        # still hold the tensors): release what the request allocated before the next one.
        gc.collect()
        if self.device is not None and self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        return answer


def main() -> int:
    results = os.fdopen(os.dup(1), "w", buffering=1)  # the response channel
    os.dup2(2, 1)  # anything else written to stdout (prints, C++ logs) goes to stderr
    sys.stdout = sys.stderr
    server = Server()
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req.get("op") == "exit":
            break
        results.write(json.dumps(server.handle(req)) + "\n")
        results.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
