"""The sweep: device ceilings first, then every provider over the size ladders, then the
end-to-end step. The parent process only plans; every measurement runs in a worker.

Skip rules, each recorded with its reason (nothing is dropped silently):
  - the provider cannot run here (e.g. triton without CUDA, a cpp build that failed);
  - predicted memory: inputs + predicted workspace above the memory limit. The workspace is the
    provider's last measured workspace in the same series scaled by N^2 (unfused SupCon) or N
    (everything else), or, for the first size of a series, the model in ffkern.bench.workload;
  - predicted time per call above --max-call-s: the last measured time scaled the same way, or
    for the first size the work divided by the device's measured ceiling (a lower bound);
  - the run's own time budget (--max-total-s) is spent;
  - a smaller size of the same series failed or ran out of memory.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from .._cliargs import path_component
from .ceilings import ceiling_key
from .e2e import E2EConfig
from .machine_load import LoadProbe, describe
from .providers import FF_LOSSES, FUSED, PROVIDERS, TRITON_NEEDS_CUDA
from .worker import WorkerClient, WorkerDied
from .workload import (DTYPES, MODES, ff_bytes, ff_input_bytes, predicted_extra_bytes, scaled, supcon_flops,
                       supcon_input_bytes)

WHAT = ("supcon", "ff", "e2e")
FULL_NS = tuple(2 ** k for k in range(10, 21))  # 1024 .. 2^20
FULL_FF_SIZES = tuple(2 ** k for k in range(20, 31, 2))  # B*D = 2^20 .. 2^30


@dataclass
class SweepConfig:
    device: str = "auto"
    tag: str = "full"
    what: Sequence[str] = WHAT
    providers: Sequence[str] = PROVIDERS
    ns: Sequence[int] = FULL_NS
    ds: Sequence[int] = (64, 128, 256)
    dtypes: Sequence[str] = ("float32", "bfloat16")
    modes: Sequence[str] = MODES
    ff_sizes: Sequence[int] = FULL_FF_SIZES
    ff_d: int = 1024
    ff_losses: Sequence[str] = FF_LOSSES
    classes: int = 10
    seed: int = 0
    warmup: int = 1  # CPU: untimed calls before the timed ones (after the first, compiling call)
    repeats: int = 5  # CPU: timed calls (median)
    warmup_ms: float = 25.0  # GPU: do_bench warm-up time
    rep_ms: float = 100.0  # GPU: do_bench timed duration
    max_call_s: float = 5.0
    max_mem_gb: Optional[float] = None
    max_total_s: Optional[float] = None
    fp32_precision: str = "highest"
    compile_backend: str = "inductor"
    compile_dynamic: bool = False
    quick_ceilings: bool = False
    e2e: E2EConfig = field(default_factory=E2EConfig)
    note: str = ""
    request_timeout_s: float = 1800.0
    threads: Optional[int] = None  # CPU: torch.set_num_threads in the workers (None: torch's default)

    def check(self) -> "SweepConfig":
        for name, values, allowed in (("what", self.what, WHAT), ("providers", self.providers, PROVIDERS),
                                      ("dtypes", self.dtypes, tuple(DTYPES)), ("modes", self.modes, MODES),
                                      ("ff_losses", self.ff_losses, FF_LOSSES)):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f"{name} must be a non-empty selection of {list(allowed)}, got {list(values)}")
        for name, values in (("ns", self.ns), ("ds", self.ds), ("ff_sizes", self.ff_sizes)):
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 2 for v in values):
                raise ValueError(f"{name} must be integers >= 2, got {list(values)}")
        if isinstance(self.ff_d, bool) or not isinstance(self.ff_d, int) or self.ff_d < 1:
            raise ValueError(f"ff_d (--ff-d) must be an integer >= 1, got {self.ff_d!r}")
        bad = [s for s in self.ff_sizes if s % self.ff_d]
        if bad:
            raise ValueError(f"ff_sizes must be multiples of ff_d={self.ff_d}, got {bad}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.fp32_precision not in ("highest", "high", "medium"):
            raise ValueError(f"fp32_precision must be 'highest', 'high' or 'medium', got {self.fp32_precision!r}")
        if self.max_call_s <= 0 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("max_call_s must be > 0, repeats >= 1 and warmup >= 0")
        for name in ("rep_ms", "max_mem_gb", "max_total_s", "threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.warmup_ms < 0:
            raise ValueError(f"warmup_ms must be >= 0, got {self.warmup_ms}")
        check_tag(self.tag)
        if "e2e" in self.what and self.e2e.width % self.e2e.heads:  # attention splits E into H equal heads
            raise ValueError(f"the e2e ViT's width (--e2e-width) {self.e2e.width} must be divisible by its heads"
                             f" (--e2e-heads) {self.e2e.heads}")
        return self


def check_tag(tag: str) -> str:
    """The results go to <out>/<device>/<tag>/: a tag with a separator or '..' would put them
    elsewhere (the command line refuses it while parsing; this is for the Python API)."""
    try:
        return path_component(tag)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"tag (--tag) {exc}") from None


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' (--device cuda) was asked for, but torch sees no CUDA device (use --device cpu)")
    return name


def _git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


class _Series:
    """The last successful measurement of one series (provider, kind, mode, dtype, D[, loss])."""

    def __init__(self):
        self.last: Optional[Dict] = None
        self.stopped: Optional[str] = None


class Sweep:
    def __init__(self, cfg: SweepConfig, log: Callable[[str], None] = print):
        self.cfg = cfg.check()
        self.log = log
        self.device = resolve_device(cfg.device)
        self.t0 = time.perf_counter()
        self.info: Dict = {}
        self.ceilings: Dict = {}
        self.mem_limit = 0.0

    # ------------------------------------------------------------------ plumbing
    def _init_message(self, provider: Optional[str]) -> Dict:
        c = self.cfg
        return {"device": self.device, "provider": provider, "fp32_precision": c.fp32_precision,
                "compile_backend": c.compile_backend, "compile_dynamic": c.compile_dynamic, "threads": c.threads}

    def _worker(self, provider: Optional[str]) -> WorkerClient:
        return WorkerClient(self._init_message(provider), timeout_s=self.cfg.request_timeout_s)

    def _elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _budget_spent(self) -> bool:
        return self.cfg.max_total_s is not None and self._elapsed() > self.cfg.max_total_s

    # ------------------------------------------------------------------ the run
    def run(self) -> Dict:
        c = self.cfg
        started = datetime.datetime.now(datetime.timezone.utc)
        load_start = _loadavg()
        self.log(f"ffkern bench [{c.tag}] on {self.device}: measuring the device's ceilings")
        with self._worker(None) as w:
            if not w.init.get("ok"):
                raise RuntimeError(f"the measuring worker could not start on {self.device}: {w.init.get('reason')}")
            self.info = w.init["info"]
            with LoadProbe() as ceiling_probe:
                answer = w.request({"op": "ceilings", "quick": c.quick_ceilings})
        if not answer.get("ok"):
            raise RuntimeError(f"the ceilings could not be measured: {answer.get('reason')}")
        self.ceilings = answer["ceilings"]
        if ceiling_probe.result.get("under_load"):  # every fraction of a ceiling inherits it
            self.log(f"  the ceilings were measured under load{describe(ceiling_probe.result)}: fractions of them"
                     f" are doubtful")
        for key, v in self.ceilings.items():
            unit = "TFLOP/s" if v["unit"] == "flop/s" else "GB/s"
            scale = 1e12 if v["unit"] == "flop/s" else 1e9
            self.log(f"  ceiling {key:12s} {v['value'] / scale:10.3f} {unit}  ({v['what']})")
        avail = float(self.info.get("available_memory_bytes") or self.info.get("total_memory_bytes") or 0)
        # GPU: the free memory less 10% for the allocator and CUDA's own; CPU: half of what is
        # available (the machine may be shared, and an OOM kill could hit someone else's process).
        self.mem_limit = avail * (0.9 if self.device == "cuda" else 0.5)
        if c.max_mem_gb is not None:
            self.mem_limit = min(self.mem_limit, c.max_mem_gb * 2**30)
        self.log(f"  memory limit per measurement: {_fmt_bytes(self.mem_limit)}")

        providers: Dict[str, Dict] = {}
        rows: Dict[str, List[Dict]] = {"supcon": [], "ff": []}
        kinds = [k for k in ("supcon", "ff") if k in c.what]
        for name in c.providers if kinds else ():
            providers[name] = self._run_provider(name, kinds, rows)
        e2e = self._run_e2e() if "e2e" in c.what else None
        return {
            "meta": {
                "tag": c.tag, "device": self.info.get("name"), "device_type": self.device, "device_info": self.info,
                "date": started.isoformat(timespec="seconds"), "duration_s": round(self._elapsed(), 1),
                "torch": self.info.get("torch"), "triton": _version("triton"), "ffkern": _version("ffkern"),
                "python": platform.python_version(), "git_commit": _git_commit(), "command": " ".join(sys.argv),
                "note": c.note, "load_average_start": load_start, "load_average_end": _loadavg(),
                "ceilings_load": ceiling_probe.result,
                "memory_limit_bytes": self.mem_limit, "settings": _settings(c),
            },
            "ceilings": self.ceilings, "providers": providers, "supcon": rows["supcon"], "ff": rows["ff"], "e2e": e2e,
        }

    def _run_provider(self, name: str, kinds: Sequence[str], rows: Dict[str, List[Dict]]) -> Dict:
        if name == "triton" and self.device != "cuda":  # known without starting a worker
            self.log(f"[{name}] skipped: {TRITON_NEEDS_CUDA}")
            return {"status": "skipped", "reason": TRITON_NEEDS_CUDA}
        try:
            worker = self._worker(name)
        except WorkerDied as exc:
            self.log(f"[{name}] failed to start: {exc}")
            return {"status": "failed", "reason": str(exc)}
        why = worker.init.get("unavailable") if worker.init.get("ok") else worker.init.get("reason")
        if why:
            worker.close()
            self.log(f"[{name}] skipped: {why}")
            return {"status": "skipped", "reason": why}
        self.log(f"[{name}] measuring")
        try:
            for plan in self._plans(kinds):
                series = _Series()
                for size in plan["sizes"]:
                    row, worker = self._one(name, worker, plan, size, series)
                    rows[plan["kind"]].append(row)
        finally:
            worker.close()
        return {"status": "ok", "reason": None}

    def _plans(self, kinds: Sequence[str]):
        c = self.cfg
        if "supcon" in kinds:
            for d in c.ds:
                for dtype in c.dtypes:
                    for mode in c.modes:
                        yield {"kind": "supcon", "mode": mode, "dtype": dtype, "d": d, "sizes": sorted(c.ns)}
        if "ff" in kinds:
            for loss in c.ff_losses:
                for dtype in c.dtypes:
                    for mode in c.modes:
                        yield {"kind": "ff", "mode": mode, "dtype": dtype, "d": c.ff_d, "loss": loss, "sizes": sorted(c.ff_sizes)}

    def _one(self, name: str, worker: WorkerClient, plan: Dict, size: int, series: _Series):
        c = self.cfg
        kind, mode, dtype, d = plan["kind"], plan["mode"], plan["dtype"], plan["d"]
        row = {"kind": kind, "provider": name, "mode": mode, "dtype": dtype, "d": d}
        if kind == "supcon":
            row["n"] = size
            work, unit = supcon_flops(size, d, mode), "flop"
            inputs = supcon_input_bytes(size, d, dtype)
        else:
            row.update(size=size, b=size // d, loss_kind=plan["loss"])
            work, unit = ff_bytes(size, dtype, mode), "B"
            inputs = ff_input_bytes(size, dtype)
        key = ceiling_key(kind, dtype, self.device, c.fp32_precision)
        ceiling = self.ceilings.get(key, {}).get("value")
        row.update(work=work, work_unit=unit, ceiling=key, ceiling_value=ceiling)
        fused = name in FUSED
        power = 2.0 if (kind == "supcon" and not fused) else 1.0
        time_power = 2.0 if kind == "supcon" else 1.0
        last = series.last
        if last is not None and last.get("mem_bytes") is not None:
            mem_pred = scaled(max(last["mem_bytes"], 1), last["size"], size, power)
            mem_how = f"scaled from {last['size']}"
        else:
            mem_pred = predicted_extra_bytes(fused, kind, mode, size, d, dtype)
            mem_how = "model"
        t_pred = scaled(last["time_s"], last["size"], size, time_power) if last else (work / ceiling if ceiling else 0.0)
        row["predicted_mem_bytes"] = mem_pred

        label = f"[{name}] {kind} {plan.get('loss', '') + ' ' if kind == 'ff' else ''}{mode} {dtype} D={d} " + \
                (f"N={size}" if kind == "supcon" else f"B*D={size}")
        reason = None
        if series.stopped:
            reason = series.stopped
        elif self._budget_spent():
            reason = f"the run's time budget (--max-total-s {c.max_total_s:g}) was spent"
        elif inputs + mem_pred > self.mem_limit:
            reason = (f"predicted memory {_fmt_bytes(inputs)} inputs + {_fmt_bytes(mem_pred)} workspace ({mem_how}) "
                      f"exceeds the limit {_fmt_bytes(self.mem_limit)}")
        elif t_pred > c.max_call_s:
            how = f"scaled from N={last['size']}" if (last and kind == 'supcon') else ("scaled" if last else "work / ceiling")
            reason = f"predicted {t_pred:.3g} s per call ({how}) exceeds --max-call-s {c.max_call_s:g}"
        if reason is not None:
            row.update(status="skipped", reason=reason)
            self.log(f"{label}: skipped: {reason}")
            return row, worker

        request = {"op": "measure", "kind": kind, "mode": mode, "dtype": dtype, "n": size, "d": d,
                   "loss": plan.get("loss"), "budget_bytes": self.mem_limit, "seed": c.seed, "classes": c.classes,
                   "warmup": c.warmup, "repeats": c.repeats, "max_call_total_s": max(c.max_call_s, 1.0) * 2,
                   "warmup_ms": c.warmup_ms, "rep_ms": c.rep_ms}
        try:
            with LoadProbe() as probe:
                answer = worker.request(request)
            row["load"] = probe.result
        except WorkerDied as exc:
            answer = {"ok": False, "status": "failed", "reason": f"worker died: {exc}"}
            try:
                worker = self._worker(name)  # a fresh one for what follows
            except WorkerDied as again:  # the next request fails too, and says so
                self.log(f"[{name}] could not restart the worker: {again}")
        if not answer.get("ok"):
            row.update(status=answer.get("status", "failed"), reason=answer.get("reason"))
            series.stopped = f"a smaller size ({size}) of this series did not complete: {answer.get('reason')}"
            self.log(f"{label}: {row['status']}: {row['reason']}")
            return row, worker
        answer.pop("ok")
        row.update(answer)
        row["reason"] = None
        row["rate"] = work / row["time_s"]
        row["fraction"] = row["rate"] / ceiling if ceiling else None
        series.last = {"size": size, "time_s": row["time_s"], "mem_bytes": row.get("mem_bytes")}
        self.log(f"{label}: {_fmt_time(row['time_s'])}, {_fmt_rate(row['rate'], unit)}"
                 + (f" ({100 * row['fraction']:.1f}% of {key})" if row["fraction"] is not None else "")
                 + (f", +{_fmt_bytes(row['mem_bytes'])}" if row.get("mem_bytes") is not None else "")
                 + describe(row.get("load")))
        return row, worker

    def _run_e2e(self) -> Dict:
        cfg = self.cfg.e2e
        self.log(f"e2e: one CFF step of ViT[{cfg.width} {cfg.heads} {cfg.depth}], batch {cfg.batch}, two views")
        if self._budget_spent():
            return {"status": "skipped", "reason": f"the run's time budget (--max-total-s {self.cfg.max_total_s:g}) was spent"}
        try:
            with self._worker(None) as w, LoadProbe() as probe:
                answer = w.request({"op": "e2e", "config": asdict(cfg)})
        except WorkerDied as exc:
            answer = {"ok": False, "status": "failed", "reason": f"worker died: {exc}"}
        if not answer.get("ok"):
            self.log(f"e2e: {answer.get('status')}: {answer.get('reason')}")
            return {"status": answer.get("status", "failed"), "reason": answer.get("reason")}
        out = dict(answer["e2e"], status="ok", load=probe.result)
        self.log(f"e2e: paper-style {_fmt_time(out['paper_style']['step_s'])}/step, ffkern "
                 f"{_fmt_time(out['ffkern']['step_s'])}/step ({out['speedup']:.2f}x), "
                 f"first-step losses max |diff| {out['first_step_max_abs_diff']:.2e}" + describe(probe.result))
        return out


def _settings(c: SweepConfig) -> Dict:
    out = asdict(c)
    out["e2e"] = asdict(c.e2e)
    return out


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


def _fmt_rate(r: float, unit: str) -> str:
    if unit == "flop":
        return f"{r / 1e12:.3f} TFLOP/s" if r >= 1e11 else f"{r / 1e9:.2f} GFLOP/s"
    return f"{r / 1e9:.1f} GB/s"


def run_sweep(cfg: SweepConfig, log: Callable[[str], None] = print) -> Dict:
    return Sweep(cfg, log).run()
