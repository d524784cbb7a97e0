"""oxigaf benchmarks: attention modes, one UNet step against the reference cost model, DDIM
overhead, VAE decoding and the whole pipeline, per backend. Prints a table, writes JSON.

    python benchmarks/run.py [--quick] [--json PATH] [--backend NAME ...] [--only BENCH ...]

Every case runs in a fresh Python process (so peak memory is that case's alone, and a case that
runs out of memory or time is reported, not fatal). Ratios compare against a baseline timed in
the same process, alternating call by call, median of the runs: a shared machine is noisy.
See README.md for the method and cases.py for how time and memory are measured.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

SEQS = (1024, 5120, 8192, 20480)
MODES = ("naive", "chunked", "sdpa")
# Memory kept free for the system and the other processes on the machine.
MARGIN = 1.5e9
# mlx's Linux CPU build bundles a reference BLAS: a 2048² matmul takes seconds, not
# milliseconds. Its sizes are capped so a run stays within minutes.
MLX_CPU_SEQS = {"quick": (1024, 5120), "full": (1024, 5120, 8192)}


def _mlx_cpu_blas(args) -> str | None:
    """The BLAS that mlx's CPU processes get: "torch" (torch's MKL, lent), "openblas" (preloaded)
    or "reference"."""
    if not sys.platform.startswith("linux"):
        return None
    if args.mlx_blas == "torch" and _have("torch"):
        return "torch"
    return "openblas" if args.mlx_blas == "openblas" and os.path.exists(OPENBLAS) else "reference"


MARK = "@@RESULT "
# What mlx's Linux CPU wheel gets instead of the reference BLAS it bundles (on which its matmuls and
# convolutions are far slower; docs/performance.md). "torch" (the default, as in the test suite): torch's MKL,
# lent before mlx loads (oxigaf_mlx.blas says how). "openblas": Debian's OpenBLAS (package
# libopenblas0-pthread), preloaded. Same results either way; --mlx-blas reference keeps the wheel's.
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
# tells a case process to lend mlx torch's MKL before anything imports mlx
LEND_ENV = "OXIGAF_BENCH_MLX_BLAS"


def _have(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def _cpu_flags() -> list[str]:
    """The CPU's feature flags from /proc/cpuinfo (OSError, StopIteration where there are none)."""
    with open("/proc/cpuinfo") as f:
        return next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        info["cpu_flags"] = sorted(f for f in _cpu_flags() if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))
        with open("/proc/meminfo") as f:
            info["memory_bytes"] = int(f.readline().split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    for pkg in ("numpy", "torch", "mlx", "diffusers", "transformers"):
        info[pkg] = _version(pkg)
    if _have("torch"):
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def _on_gpu(backend: str) -> bool:
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    if backend == "mlx":
        import mlx.core as mx

        return mx.default_device() == mx.gpu
    return False


NO_BF16 = ("this CPU has no AVX-512 (AVX2 only), so torch has no fast bfloat16 path here: a bfloat16 "
           "matmul (10240x320 @ 320x1280) took 6.6 s against 0.066 s in float32")


def _cpu_bfloat16() -> bool:
    """Whether torch's CPU kernels have a bfloat16 path worth timing: on x86, AVX-512 (native
    with AVX512_BF16 or AMX, by conversion otherwise); elsewhere assumed."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return True
    try:
        flags = _cpu_flags()
    except (OSError, StopIteration):
        return True
    return "avx512f" in flags or "amx_bf16" in flags


def plan(args) -> list[dict]:
    """Every case of the run, in order; a case with ``skipped`` is reported, not run."""
    import cases

    quick = args.quick
    size = "quick" if quick else "full"
    specs: list[dict] = []
    want = set(args.only or ("attention", "unet_step", "ddim_step", "vae_decode", "pipeline", "pipeline_512",
                             "refine", "train_step"))
    for backend in args.backend:
        gpu = _on_gpu(backend)
        # with the reference BLAS, mlx on the CPU is limited to what finishes in minutes
        slow = backend == "mlx" and not gpu and _mlx_cpu_blas(args) == "reference"
        if "attention" in want:
            dtypes = ["float32"] if quick and not gpu else ["float32", "bfloat16"]
            for dtype in dtypes:
                for seq in args.seqs or SEQS:
                    for mode in MODES:
                        spec = {"bench": "attention", "backend": backend, "dtype": dtype, "seq": seq, "mode": mode}
                        if slow and seq not in MLX_CPU_SEQS[size]:
                            spec["skipped"] = f"not run on mlx's CPU backend at this length ({size} run): its " \
                                              "bundled reference BLAS is ~30x slower than torch's"
                        specs.append(spec)
        if "unet_step" in want:
            for model in ("imagedream", "demo"):
                for compiled in (False, True):
                    spec = {"bench": "unet_step", "backend": backend, "dtype": "float32+bfloat16",
                            "dtypes": ["float32", "bfloat16"], "rounds": 3 if quick else 5, "model": model,
                            "compiled": compiled}
                    if backend == "mlx" and not gpu:
                        spec.update(dtypes=["float32"], dtype="float32", rounds=1 if quick else 3)
                        if slow and quick and model == "imagedream":
                            spec["skipped"] = "full-size UNet step not run on mlx's CPU backend in --quick " \
                                              "(minutes per call with its reference BLAS)"
                    if backend == "torch" and not gpu and not _cpu_bfloat16():
                        specs.append({**spec, "dtype": "bfloat16", "dtypes": ["bfloat16"], "skipped": NO_BF16})
                        spec.update(dtypes=["float32"], dtype="float32")
                    if compiled and backend == "torch" and not gpu:
                        # a process per dtype: the frozen graph holds a second copy of the weights
                        # (inductor's freezing), so a process holds one dtype's models only
                        specs += [{**spec, "dtype": dt, "dtypes": [dt]} for dt in spec["dtypes"]]
                        continue
                    specs.append(spec)
        if "ddim_step" in want:
            specs.append({"bench": "ddim_step", "backend": backend, "dtype": "float32"})
        if "vae_decode" in want:
            spec = {"bench": "vae_decode", "backend": backend, "dtype": "float32", "sizes": [256, 512],
                    "rounds": 1 if quick else 3}
            if backend == "mlx" and not gpu and quick:
                spec["sizes"] = [256]
            if slow:
                # minutes per decode on the reference BLAS
                spec.update(sizes=[256], rounds=1)
                if quick:
                    spec["skipped"] = "not run on mlx's CPU backend in --quick (minutes per decode with its " \
                                      "reference BLAS)"
            specs.append(spec)
        if "pipeline" in want:
            for dtype in ["float32"] if quick else ["float32", "bfloat16"]:
                spec = {"bench": "pipeline", "backend": backend, "dtype": dtype, "steps": 2 if quick else 5}
                if slow:
                    spec["skipped"] = "not run on mlx's CPU backend (tens of minutes with its reference BLAS)"
                elif backend == "mlx" and not gpu and quick:
                    spec["skipped"] = "not run on mlx's CPU backend in --quick (a few minutes; see the full run)"
                specs.append(spec)
        if "pipeline_512" in want:
            # the whole path at 512 px: 50 DDIM steps where a GPU makes it minutes, 2 on a CPU (the
            # row also gives the 50-step estimate from the measured per-step time)
            spec = {"bench": "pipeline_512", "backend": backend, "dtype": "float32" if not gpu else "bfloat16",
                    "steps": 50 if gpu else 2, "upsampler_steps": 10}
            if backend == "mlx" and not gpu:
                spec["skipped"] = "not run on mlx's CPU backend (tens of minutes); the torch row shows the path"
            specs.append(spec)
        if "refine" in want:
            spec = {"bench": "refine", "backend": backend, "dtype": "float32", "strength": 0.04 if quick else 0.5,
                    "rounds": 1 if quick else 2}
            if backend == "mlx" and not gpu:
                spec["skipped"] = "not run on mlx's CPU backend (minutes per call); the torch row shows the caching"
            specs.append(spec)
        if "train_step" in want:
            specs += _train_specs(backend, gpu, quick)
    if "ddim_step" in want and "numpy" not in args.backend:
        specs.append({"bench": "ddim_step", "backend": "numpy", "dtype": "float32"})
    # Guard against what cannot fit: a skipped entry, never a crashed run.
    for spec in specs:
        if spec["bench"] == "train_step" and "skipped" in spec:
            spec.pop("need_bytes", None)
        if spec["bench"] == "attention" and "skipped" not in spec:
            need = cases.attention_need(spec["backend"], spec["mode"], spec["seq"], spec["dtype"],
                                        _on_gpu(spec["backend"]))
            spec["need_bytes"] = need
    return specs


def _train_specs(backend: str, gpu: bool, quick: bool) -> list[dict]:
    """train_step: the real UNet where it fits (a GPU), the small one on a CPU; full and LoRA."""
    import cases

    real_params = 941_672_900  # benchmarks/manifests/imagedream-unet
    specs = []
    dtypes = ["float32", "bfloat16"] if (gpu or not quick) else ["float32"]
    for model in ("small", "real"):
        for dtype in dtypes:
            for lora_rank, ckpt in ((0, False), (0, True), (8, False)):
                if model == "small" and ckpt:
                    continue
                spec = {"bench": "train_step", "backend": backend, "dtype": dtype, "model": model,
                        "lora_rank": lora_rank, "grad_checkpointing": ckpt, "rounds": 1 if quick else 3,
                        "latent": 16 if (quick and not gpu) else 32}
                if model == "real":
                    if not gpu:
                        spec["skipped"] = "real-shape UNet training not run on a CPU (minutes per step); estimate " \
                                          f"{cases.train_state_bytes(real_params) / 1e9:.1f} GB of AdamW state"
                    spec["need_bytes"] = cases.train_state_bytes(real_params) if not lora_rank else 5 * real_params
                specs.append(spec)
    return specs


def _free_bytes(backend: str) -> float:
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.mem_get_info()[0]
    import cases

    return cases.available_bytes()


def _head(spec: dict) -> dict:
    keys = ("bench", "backend", "dtype", "seq", "mode", "model", "latent", "lora_rank", "grad_checkpointing")
    return {k: spec[k] for k in keys if k in spec}


def _precheck(spec: dict) -> dict | None:
    """The result entry of a case that is not run (skipped by plan, or too big for free memory)."""
    if "skipped" in spec:
        return {**_head(spec), "skipped": spec["skipped"]}
    if "need_bytes" in spec:
        free = _free_bytes(spec["backend"]) - MARGIN
        if spec["need_bytes"] > free:
            return {**_head(spec), "skipped": f"needs {spec['need_bytes'] / 1e9:.1f} GB, "
                                              f"{max(free, 0) / 1e9:.1f} GB available"}
    return None


def run_group(specs: list[dict], timeout: float, env: dict | None = None) -> list[dict]:
    """Run cases one after another in one fresh process; a crash or time-out is reported for
    every case that had not finished."""
    child = [{k: v for k, v in spec.items() if k != "need_bytes"} for spec in specs]
    t0 = time.perf_counter()
    stdout, err = "", None
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(child)],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        stdout = proc.stdout
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
            err = f"{why}: " + " | ".join(tail)
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = f"timed out after {timeout:.0f} s"
    results = [json.loads(line[len(MARK):]) for line in stdout.splitlines() if line.startswith(MARK)]
    done = {r.pop("case") for r in results}
    if err:
        results += [{**_head(spec), "error": err} for i, spec in enumerate(specs) if i not in done]
    for r in results:
        r.setdefault("case_seconds", round(time.perf_counter() - t0, 2))
    return results


def _shares_process(spec: dict) -> bool:
    """Attention cases whose memory the framework counts itself (CUDA, mlx) share one process;
    torch on the CPU needs a fresh process per case for its RSS-based peak."""
    return spec["bench"] == "attention" and (spec["backend"] == "mlx" or _on_gpu(spec["backend"]))


# --------------------------------------------------------------------------- table


def _fmt_s(x):
    if x is None:
        return "-"
    return f"{x * 1e3:.2f} ms" if x < 0.1 else f"{x:.2f} s"


def _fmt_b(x):
    if x is None:
        return "-"
    return f"{x / 1e9:.2f} GB" if abs(x) >= 1e8 else f"{x / 1e6:.1f} MB"


def _fmt_r(x):
    return "-" if x is None else f"{x:.3f}"


def table(results: list[dict]) -> str:
    out = []

    def section(title, header, rows):
        if not rows:
            return
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
        out.append(f"\n## {title}\n")
        out.append("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
        out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for row in rows:
            out.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")

    def note(r):
        return r.get("skipped") or r.get("error") or r.get("note") or ""

    rows = [[r["backend"], r["dtype"], r.get("seq", ""), r.get("mode", ""), _fmt_s(r.get("seconds")),
             _fmt_b(r.get("peak_bytes")), note(r)] for r in results if r["bench"] == "attention"]
    section("attention (batch 2, 5 heads, head dim 64)",
            ["backend", "dtype", "seq", "mode", "seconds", "peak memory", "note"], rows)
    rows = [[r["backend"], r.get("model", "imagedream"), "yes" if r.get("compiled") else "no", r["dtype"],
             _fmt_s(r.get("seconds")), _fmt_s(r.get("baseline_seconds")),
             _fmt_r(r.get("ratio")), _fmt_s(r.get("baseline_float32_seconds")),
             _fmt_r(r.get("ratio_vs_float32_baseline")),
             "-" if r.get("eps_rel_l2_vs_float32") is None else f"{r['eps_rel_l2_vs_float32']:.2e}",
             _fmt_s(r.get("first_call_seconds")),
             "-" if r.get("eps_rel_l2_vs_eager") is None else f"{r['eps_rel_l2_vs_eager']:.2e}",
             {True: "yes", False: "no"}.get(r.get("winograd"), "-"),
             "-" if r.get("eps_rel_l2_vs_direct") is None else f"{r['eps_rel_l2_vs_direct']:.2e}", note(r)]
            for r in results if r["bench"] == "unet_step"]
    section("unet_step (10 frames = (4 views + reference) x CFG, 32x32 latents, prepared conditioning; model "
            "imagedream: real shape, demo: the demo model's shape, each against its diffusers stand-in)",
            ["backend", "model", "compiled", "dtype", "seconds", "baseline (same dtype)", "ratio", "baseline float32",
             "ratio vs f32", "eps rel L2 vs f32", "first call (compiling)", "eps rel L2 vs eager", "winograd",
             "eps rel L2 vs direct conv", "note"], rows)
    rows = [[r["backend"], "yes" if r.get("guided") else "no", "yes" if r.get("compiled") else "no",
             _fmt_s(r.get("seconds")), _fmt_s(r.get("baseline_seconds")), _fmt_r(r.get("ratio")),
             note(r)] for r in results if r["bench"] == "ddim_step"]
    section("ddim_step ((10, 4, 32, 32); guided: CFG over (20, 4, 32, 32) first, as the loop does; "
            "baseline: diffusers on torch CPU tensors)",
            ["backend", "guided", "compiled", "seconds", "baseline", "ratio", "note"], rows)
    rows = [[r["backend"], r["dtype"], r.get("size", ""), _fmt_s(r.get("seconds")), _fmt_s(r.get("baseline_seconds")),
             _fmt_r(r.get("ratio")), note(r)] for r in results if r["bench"] == "vae_decode"]
    section("vae_decode (one image, baseline: diffusers AutoencoderKL)",
            ["backend", "dtype", "size", "seconds", "baseline", "ratio", "note"], rows)
    rows = []
    for r in results:
        if r["bench"] != "pipeline":
            continue
        st = r.get("stages", {})
        rows.append([r["backend"], r["dtype"], r.get("steps", ""), _fmt_s(r.get("load_seconds")),
                     _fmt_s(st.get("conditioning")), _fmt_s(st.get("denoising")), _fmt_s(r.get("seconds_per_step")),
                     _fmt_s(st.get("decoding")), _fmt_s(r.get("seconds")), _fmt_b(r.get("peak_rss_bytes")), note(r)])
    section("pipeline (4 views at 256 px, CFG 5, real-shape random weights)",
            ["backend", "dtype", "steps", "load", "conditioning", "denoising", "per step", "decoding", "generate",
             "peak RSS", "note"], rows)
    rows = []
    for r in results:
        if r["bench"] != "pipeline_512":
            continue
        st = r.get("stages", {})
        rows.append([r["backend"], r["dtype"], r.get("steps", ""), r.get("upsampler_steps", ""),
                     _fmt_s(r.get("load_seconds")), _fmt_s(st.get("conditioning")), _fmt_s(st.get("denoising")),
                     _fmt_s(r.get("seconds_per_step")), _fmt_s(st.get("upsampling")), _fmt_s(st.get("decoding")),
                     _fmt_s(r.get("seconds")), _fmt_s(r.get("seconds_50_steps_estimate")),
                     _fmt_b(r.get("peak_rss_bytes")), note(r)])
    section("pipeline_512 (4 views at 512 px: 256 px CFG 5, the sd-x2 upsampler, the VAE at 512; real-shape random "
            "weights)",
            ["backend", "dtype", "steps", "upsampler steps", "load", "conditioning", "denoising", "per step",
             "upsampling", "decoding", "generate", "at 50 steps (est.)", "peak RSS", "note"], rows)
    rows = [[r["backend"], r["dtype"], r.get("strength", ""), r.get("denoising_steps", ""), _fmt_s(r.get("seconds")),
             _fmt_s(r.get("baseline_seconds")), _fmt_r(r.get("ratio")), note(r)]
            for r in results if r["bench"] == "refine"]
    section("refine (GAF-style call, 4 views at 256 px, CFG 5; baseline: the photo re-encoded every call)",
            ["backend", "dtype", "strength", "steps", "cached conditioning", "photo each call", "ratio", "note"], rows)
    rows = [[r["backend"], r["dtype"], r.get("model", ""), r.get("latent", ""), r.get("lora_rank", ""),
             "yes" if r.get("grad_checkpointing") else "no", _fmt_s(r.get("seconds")),
             "-" if r.get("samples_per_second") is None else f"{r['samples_per_second']:.3f}",
             _fmt_b(r.get("peak_bytes") or r.get("peak_rss_bytes")), _fmt_b(r.get("state_bytes_estimate")), note(r)]
            for r in results if r["bench"] == "train_step"]
    section("train_step (1 sample = 4 targets + reference; forward + backward + AdamW)",
            ["backend", "dtype", "model", "latent", "LoRA rank", "grad ckpt", "seconds/step", "samples/s",
             "peak memory", "AdamW state (est.)", "note"], rows)
    return "\n".join(out)


def _borrow_baselines(results: list[dict]) -> None:
    """mlx rows without an in-process baseline (OpenBLAS preloaded there) take the torch
    process's baseline of this run for the same case."""
    for r in results:
        if r["backend"] != "mlx" or r["bench"] not in ("unet_step", "vae_decode") or r.get("baseline_seconds"):
            continue
        if r.get("skipped") or r.get("error"):
            continue
        for t in results:
            if t["backend"] == "torch" and t["bench"] == r["bench"] and t.get("dtype") == r.get("dtype") \
                    and t.get("size") == r.get("size") and t.get("baseline_seconds"):
                r.update(baseline_seconds=t["baseline_seconds"], ratio=r["seconds"] / t["baseline_seconds"],
                         baseline_from="the torch process of this run")
                r["note"] = "baseline: torch process of this run (OpenBLAS is preloaded in mlx's)"
                break


def describe(doc: dict) -> str:
    m = doc["machine"]
    gpu = f", {m['cuda_device']} (CUDA {m.get('cuda')})" if m.get("cuda_device") else ""
    load = [round(x, 2) for x in m.get("load_average_start") or ()]
    return (f"{'--quick' if doc.get('quick') else 'full'} run of {doc.get('started')}: {m.get('cpu')}, "
            f"{m.get('cpu_count')} cores, {m.get('memory_bytes', 0) / 2**30:.0f} GiB{gpu}; Python {m.get('python')}, "
            f"torch {m.get('torch')} ({m.get('torch_threads')} threads), mlx {m.get('mlx')}, "
            f"diffusers {m.get('diffusers')}"
            + (f" (mlx CPU BLAS: {m['mlx_cpu_blas']})" if m.get("mlx_cpu_blas") else "")
            + f"; commit {m.get('git_commit')}; load average at start {load}; "
            + (f"wall time {doc['wall_seconds']:.0f} s" if doc.get("wall_seconds") is not None else "wall time -"))


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer runs and sizes (about 15 minutes on 2 CPU cores)")
    p.add_argument("--json", default=None, help="where to write the results (default benchmarks/results/<name>.json)")
    p.add_argument("--backend", nargs="+", default=None, help="torch and/or mlx (default: those installed)")
    p.add_argument("--only", nargs="+",
                   choices=["attention", "unet_step", "ddim_step", "vae_decode", "pipeline", "pipeline_512", "refine",
                            "train_step"],
                   help="run only these benchmarks")
    p.add_argument("--seqs", nargs="+", type=int,
                   help=f"attention sequence lengths (default {' '.join(map(str, SEQS))})")
    p.add_argument("--mlx-blas", choices=["torch", "openblas", "reference"], default="torch",
                   help="mlx on a Linux CPU: lend it torch's MKL (default), preload Debian's OpenBLAS when "
                        "installed, or keep the reference BLAS its wheel bundles")
    p.add_argument("--table", metavar="JSON", help="print the table of an earlier run's JSON and exit")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per case")
    args = p.parse_args(argv)

    if args.case:
        if os.environ.get(LEND_ENV) == "torch":
            from oxigaf_mlx.blas import TORCH_MKL, lend_torch_blas

            lent = lend_torch_blas()
            if lent != TORCH_MKL:  # the plan assumed a fast BLAS: fail rather than run for hours
                sys.exit(f"mlx CPU BLAS: {lent}")
        import cases

        for i, spec in enumerate(json.loads(args.case)):
            for r in cases.run_case(spec):
                print(MARK + json.dumps({**r, "case": i}), flush=True)
        return 0

    if args.table:
        doc = json.loads(Path(args.table).read_text())
        print(describe(doc))
        print(table(doc["results"]))
        return 0

    args.backend = args.backend or [b for b in ("torch", "mlx") if _have(b)]
    t0 = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info = machine()
    info["load_average_start"] = os.getloadavg()
    if "mlx" in args.backend and not _on_gpu("mlx"):
        info["mlx_cpu_blas"] = _mlx_cpu_blas(args)
    print(f"machine: {info.get('cpu')}, {info.get('cpu_count')} cores; torch {info.get('torch')}, "
          f"mlx {info.get('mlx')}, diffusers {info.get('diffusers')}", flush=True)
    timeout = args.timeout or (900 if args.quick else 3600)
    results = []
    specs = plan(args)
    i = 0
    while i < len(specs):
        group = [specs[i]]
        if _shares_process(specs[i]):
            while i + len(group) < len(specs) and _shares_process(specs[i + len(group)]) \
                    and _head(specs[i + len(group)])["backend"] == specs[i]["backend"]:
                group.append(specs[i + len(group)])
        i += len(group)
        c0 = time.perf_counter()
        pre = [_precheck(spec) for spec in group]
        todo = [spec for spec, p in zip(group, pre, strict=True) if p is None]
        env, blas = None, None
        if group[0]["backend"] == "mlx" and not _on_gpu("mlx"):
            blas = _mlx_cpu_blas(args)
            if blas == "torch":
                env = {**os.environ, LEND_ENV: "torch"}
            elif blas == "openblas":
                env = {**os.environ, "LD_PRELOAD": ":".join(filter(None, [OPENBLAS, os.environ.get("LD_PRELOAD")]))}
        got = [p for p in pre if p is not None] + (run_group(todo, timeout * len(todo), env) if todo else [])
        if blas:
            for r in got:
                r["blas"] = blas
        results.extend(got)
        for r in got:
            label = " ".join(f"{k}={r[k]}" for k in ("bench", "backend", "dtype", "seq", "mode") if k in r)
            print(f"  {label}: {r.get('skipped') or r.get('error') or 'ok'}", flush=True)
        print(f"    ({time.perf_counter() - c0:.1f} s)", flush=True)
    _borrow_baselines(results)
    wall = time.perf_counter() - t0
    doc = {"machine": info, "quick": args.quick, "backends": args.backend, "started": started,
           "wall_seconds": round(wall, 1), "load_average_end": os.getloadavg(), "results": results}
    print(describe(doc))
    print(table(results))
    path = Path(args.json) if args.json else HERE / "results" / ("quick.json" if args.quick else "full.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
