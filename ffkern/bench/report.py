"""A run's results: derived columns (speed-up over the eager reference, agreement of the loss
values between providers), the terminal table, and the files under
``<out>/<device-slug>/<tag>/``: results.json (everything), supcon.csv, ff.csv, e2e.csv and PNG
plots (time and memory against N, one line per provider).
"""
from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from typing import Dict, List, Optional

from .devinfo import slug

# Relative difference of loss values (and gradient norms) between a provider and the reference
# above which a row is flagged. bf16 inputs: the fused kernels multiply bf16 operands while the
# reference widens to fp32 first, so their results differ by bf16 rounding of the products.
AGREEMENT_TOL = {"float32": 1e-4, "bfloat16": 3e-2}
SUPCON_COLUMNS = ["provider", "mode", "dtype", "d", "n", "status", "time_s", "min_s", "rate", "work", "work_unit", "ceiling",
                  "ceiling_value", "fraction", "speedup_vs_reference", "mem_bytes", "mem_beyond_io_bytes",
                  "predicted_mem_bytes", "copies", "loss_value", "grad_norm", "loss_rel_diff", "agrees", "under_load",
                  "other_processes_cores", "reason"]
FF_COLUMNS = ["provider", "loss_kind", "mode", "dtype", "d", "b", "size", "status", "time_s", "min_s", "rate", "work",
              "work_unit", "ceiling", "ceiling_value", "fraction", "speedup_vs_reference", "mem_bytes",
              "mem_beyond_io_bytes", "predicted_mem_bytes", "copies", "loss_value", "grad_norm", "loss_rel_diff", "agrees",
              "under_load", "other_processes_cores", "reason"]


def _key(row: Dict):
    return (row["kind"], row["mode"], row["dtype"], row["d"], row.get("n"), row.get("size"), row.get("loss_kind"))


def _rel(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None:
        return None
    return abs(a - b) / max(abs(b), 1e-6)


def add_derived(results: Dict) -> Dict:
    """Speed-up over the reference and agreement with it, per row (in place; returns results)."""
    for kind in ("supcon", "ff"):
        ref = {_key(r): r for r in results.get(kind, []) if r["provider"] == "reference" and r.get("status") == "ok"}
        for row in results.get(kind, []):
            r = ref.get(_key(row))
            load = row.get("load") or {}
            row["under_load"], row["other_processes_cores"] = load.get("under_load"), load.get("other_processes_cores")
            row["speedup_vs_reference"] = None
            row["loss_rel_diff"] = None
            row["agrees"] = None
            if row.get("status") != "ok" or r is None:
                continue
            row["speedup_vs_reference"] = r["time_s"] / row["time_s"]
            # a ratio of two figures of which one was slowed by other processes says little
            row["speedup_under_load"] = bool(row["under_load"] or (r.get("load") or {}).get("under_load"))
            diffs = [d for d in (_rel(row.get("loss_value"), r.get("loss_value")), _rel(row.get("grad_norm"), r.get("grad_norm")))
                     if d is not None]
            row["loss_rel_diff"] = max(diffs) if diffs else None
            row["agrees"] = None if not diffs else bool(max(diffs) <= AGREEMENT_TOL[row["dtype"]])
    return results


def disagreements(results: Dict) -> List[Dict]:
    return [r for kind in ("supcon", "ff") for r in results.get(kind, []) if r.get("agrees") is False]


# ----------------------------------------------------------------------------- terminal table

def _t(s: Optional[float]) -> str:
    if s is None:
        return "-"
    return f"{s * 1e6:.0f} us" if s < 1e-3 else (f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s")


def _b(b: Optional[float]) -> str:
    if b is None:
        return "-"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _rate(row: Dict) -> str:
    r = row.get("rate")
    if r is None:
        return "-"
    if row["work_unit"] == "flop":
        return f"{r / 1e12:.2f} TF/s" if r >= 1e11 else f"{r / 1e9:.2f} GF/s"
    return f"{r / 1e9:.1f} GB/s"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _x(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def format_table(results: Dict) -> str:
    meta, ceilings = results["meta"], results["ceilings"]
    lines = [f"ffkern bench [{meta['tag']}] {meta['device']} | {meta['date']} | torch {meta['torch']} | "
             f"triton {meta['triton']} | fp32 matmul precision {meta['settings']['fp32_precision']}"]
    if meta.get("note"):
        lines.append(f"note: {meta['note']}")
    if (meta.get("ceilings_load") or {}).get("under_load"):
        lines.append(f"the ceilings were measured under load (other processes: "
                     f"{meta['ceilings_load']['other_processes_cores']:.2f} cores): fractions of them are doubtful")
    for key, c in ceilings.items():
        value = f"{c['value'] / 1e12:.3f} TFLOP/s" if c["unit"] == "flop/s" else f"{c['value'] / 1e9:.1f} GB/s"
        lines.append(f"ceiling {key}: {value} ({c['what']})")
    for name, p in results.get("providers", {}).items():
        if p["status"] != "ok":
            lines.append(f"provider {name}: {p['status']}: {p['reason']}")
    header = f"{'provider':10s} {'size':>9s} {'time':>10s} {'rate':>11s} {'of ceil':>8s} {'mem':>10s} {'vs ref':>7s}  note"
    for kind in ("supcon", "ff"):
        groups = defaultdict(list)
        for row in results.get(kind, []):
            groups[(row["mode"], row["dtype"], row["d"], row.get("loss_kind"))].append(row)
        for (mode, dtype, d, loss), rows in groups.items():
            what = "marginal SupCon" if kind == "supcon" else f"{loss} loss"
            lines += ["", f"{what} {mode} {dtype} D={d} (fraction of {rows[0]['ceiling']})", header]
            for row in sorted(rows, key=lambda r: (r.get("n") or r.get("size"), r["provider"])):
                size = row.get("n") if kind == "supcon" else row.get("size")
                power_of_two = size & (size - 1) == 0
                size_txt = f"2^{size.bit_length() - 1}" if (kind == "ff" and power_of_two) else f"{size}"
                if row.get("status") != "ok":
                    lines.append(f"{row['provider']:10s} {size_txt:>9s} {row['status']}: {row.get('reason')}")
                    continue
                note = "" if row.get("agrees") is not False else f"DISAGREES with reference (rel diff {row['loss_rel_diff']:.2e})"
                if row.get("under_load"):
                    note += f"{'; ' if note else ''}UNDER LOAD (other processes: {row['other_processes_cores']:.2f} cores)"
                speedup = _x(row.get("speedup_vs_reference")) + ("?" if row.get("speedup_under_load") else "")
                lines.append(f"{row['provider']:10s} {size_txt:>9s} {_t(row['time_s']):>10s} {_rate(row):>11s} "
                             f"{_pct(row.get('fraction')):>8s} {_b(row.get('mem_bytes')):>10s} "
                             f"{speedup:>7s}  {note}")
    if any(r.get("speedup_under_load") for kind in ("supcon", "ff") for r in results.get(kind, [])):
        lines += ["", "?: one of the two figures of this ratio was taken while other processes kept the CPU busy"
                      " (ffkern.bench.machine_load); measure again on a quiet machine"]
    e2e = results.get("e2e")
    if e2e:
        lines += ["", *format_e2e(e2e)]
    return "\n".join(lines)


def format_e2e(e2e: Dict) -> List[str]:
    if e2e.get("status") != "ok":
        return [f"end-to-end: {e2e.get('status')}: {e2e.get('reason')}"]
    c = e2e["config"]
    p, f = e2e["paper_style"], e2e["ffkern"]
    lines = [f"end-to-end: one CFF step of {e2e['model']}, batch {c['batch']}, two views (loss backend {e2e['loss_backend']})",
             f"  paper-style (two forwards per layer, plain PyTorch loss, nn.MultiheadAttention): {_t(p['step_s'])} per step",
             *([f"  paper-style on ffkern's blocks: {_t(e2e['paper_style_ffkern_blocks']['step_s'])} per step"
                f"  (ffkern {e2e['speedup_same_blocks']:.2f}x of it)"] if "paper_style_ffkern_blocks" in e2e else []),
             *(["  CPU memory: freed memory reused (ffkern.cpu_heap) in the benchmark's process, by every loop"]
               if e2e.get("cpu_heap_reuse") else []),
             f"  ffkern trainer (one forward of both views, fused loss{', bf16 autocast' if c.get('ffkern_bf16') else ''}"
             f"{', compiled layers' if c.get('ffkern_compile') else ''}): {_t(f['step_s'])} per step  ({e2e['speedup']:.2f}x)",
             *([f"  UNDER LOAD: other processes kept {e2e['load']['other_processes_cores']:.2f} cores busy during these steps"
                f" (the steps alternate, so both sides saw it; the ratio is still doubtful)"]
               if (e2e.get("load") or {}).get("under_load") else []),
             f"  {'layer':>5s} {'margin':>7s} {'paper step 0':>13s} {'ffkern step 0':>14s} {'|diff|':>9s} "
             f"{'paper step ' + str(e2e['last_step_index']):>14s} {'ffkern step ' + str(e2e['last_step_index']):>15s}"]
    for l, m in enumerate(e2e["margins"]):
        lines.append(f"  {l:5d} {m:7.3f} {p['first_losses'][l]:13.6f} {f['first_losses'][l]:14.6f} "
                     f"{abs(p['first_losses'][l] - f['first_losses'][l]):9.2e} {p['last_losses'][l]:14.6f} "
                     f"{f['last_losses'][l]:15.6f}")
    return lines


# ----------------------------------------------------------------------------- files

def _write_csv(path: str, rows: List[Dict], columns: List[str]):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for row in rows:
            w.writerow(["" if row.get(c) is None else row.get(c) for c in columns])


def _write_e2e_csv(path: str, e2e: Dict):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "margin", "paper_first_loss", "ffkern_first_loss", "paper_last_loss", "ffkern_last_loss",
                    "paper_step_s", "ffkern_step_s", "speedup", "paper_ffkern_blocks_step_s", "speedup_same_blocks"])
        for l, m in enumerate(e2e["margins"]):
            w.writerow([l, m, e2e["paper_style"]["first_losses"][l], e2e["ffkern"]["first_losses"][l],
                        e2e["paper_style"]["last_losses"][l], e2e["ffkern"]["last_losses"][l],
                        e2e["paper_style"]["step_s"], e2e["ffkern"]["step_s"], e2e["speedup"],
                        (e2e.get("paper_style_ffkern_blocks") or {}).get("step_s"), e2e.get("speedup_same_blocks")])


def _plots(results: Dict, out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = results["meta"]
    written = []
    for kind in ("supcon", "ff"):
        groups = defaultdict(list)
        for row in results.get(kind, []):
            if row.get("status") == "ok":
                groups[(row["mode"], row["dtype"], row["d"], row.get("loss_kind"))].append(row)
        for (mode, dtype, d, loss), rows in sorted(groups.items(), key=lambda kv: str(kv[0])):
            size_key = "n" if kind == "supcon" else "size"
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
            for provider in sorted({r["provider"] for r in rows}):
                pts = sorted((r for r in rows if r["provider"] == provider), key=lambda r: r[size_key])
                xs = [r[size_key] for r in pts]
                ax_t.plot(xs, [r["time_s"] for r in pts], marker="o", label=provider)
                mem = [(r[size_key], r["mem_bytes"]) for r in pts if r.get("mem_bytes") is not None]
                if mem:
                    ax_m.plot([m[0] for m in mem], [max(m[1], 1) / 2**20 for m in mem], marker="o", label=provider)
            xlabel = "N (rows)" if kind == "supcon" else "B*D (elements per tensor)"
            for ax, ylabel in ((ax_t, "time per call (s)"), (ax_m, "peak memory beyond inputs (MiB)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend()
            what = "marginal SupCon" if kind == "supcon" else f"{loss} loss"
            fig.suptitle(f"{what} {mode}, {dtype}, D={d} | {meta['device']} | {meta['date'][:10]}", fontsize=10)
            fig.tight_layout()
            name = f"{kind}_{mode}_{dtype}_d{d}.png" if kind == "supcon" else f"ff_{loss}_{mode}_{dtype}_d{d}.png"
            path = os.path.join(out_dir, name)
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def results_dir(out_root: str, results: Dict) -> str:
    from .sweep import check_tag

    tag = check_tag(results["meta"]["tag"])  # never a folder outside out_root
    return os.path.join(out_root, slug(results["meta"]["device"] or results["meta"]["device_type"]), tag)


def write_all(results: Dict, out_root: str, plots: bool = True) -> List[str]:
    """Writes every file of the run; returns their paths."""
    out_dir = results_dir(out_root, results)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    paths.append(path)
    for kind, columns in (("supcon", SUPCON_COLUMNS), ("ff", FF_COLUMNS)):
        if results.get(kind):
            path = os.path.join(out_dir, f"{kind}.csv")
            _write_csv(path, results[kind], columns)
            paths.append(path)
    if results.get("e2e") and results["e2e"].get("status") == "ok":
        path = os.path.join(out_dir, "e2e.csv")
        _write_e2e_csv(path, results["e2e"])
        paths.append(path)
    if plots:
        paths += _plots(results, out_dir)
    path = os.path.join(out_dir, "table.txt")
    with open(path, "w") as f:
        f.write(format_table(results) + "\n")
    paths.append(path)
    return paths
