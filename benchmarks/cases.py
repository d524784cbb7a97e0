"""The benchmark cases. Each runs in a fresh process (``run.py --case JSON``) and yields results.

Timing: wall clock around a call that ends with the backend's synchronisation (``mx.eval``,
``torch.cuda.synchronize``); the median of the timed calls after a warm-up.

Peak memory of one call (``peak_bytes``), by backend:
- torch on CPU: the process's resident set. Linux's peak-RSS mark (``VmHWM``) is reset to the
  current RSS just before the call (``/proc/self/clear_refs`` with ``5``), and the peak is
  ``VmHWM`` after the call minus ``VmRSS`` before it. The call runs in a fresh process, after
  one warm-up call on a tiny input, so no earlier buffer of the same size can be reused.
- torch on CUDA: ``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``)
  minus ``torch.cuda.memory_allocated`` before the call.
- mlx: ``mx.get_peak_memory`` (after ``mx.reset_peak_memory``) minus ``mx.get_active_memory``
  before the call.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BATCH, HEADS, HEAD_DIM = 2, 5, 64
CHUNK = 1024


# --------------------------------------------------------------------------- process memory


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (bytes)."""
    try:
        return _status("VmHWM")
    except (OSError, KeyError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------- backends


class Torch:
    name = "torch"

    def __init__(self, device: str | None = None):
        import torch

        from oxigaf_torch.backend import TorchBackend

        self.torch = torch
        self.backend = TorchBackend(device=device)
        self.device = self.backend.torch_device
        self.cuda = self.device.type == "cuda"
        torch.set_grad_enabled(False)

    def describe(self) -> str:
        if self.cuda:
            return self.torch.cuda.get_device_name(self.device)
        return f"cpu ({self.torch.get_num_threads()} threads)"

    def sync(self, _x=None):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def randn(self, shape, dtype: str, seed: int):
        t = self.torch.from_numpy(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))
        return t.to(self.device, getattr(self.torch, dtype))

    def free_bytes(self) -> int:
        if self.cuda:
            return self.torch.cuda.mem_get_info(self.device)[0]
        return available_bytes()

    def measure(self, fn):
        """(seconds, peak bytes above the memory in use before the call, result)."""
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
            before = self.torch.cuda.memory_allocated(self.device)
        else:
            _reset_peak_rss()
            before = _status("VmRSS")
        t0 = time.perf_counter()
        out = fn()
        self.sync(out)
        seconds = time.perf_counter() - t0
        if self.cuda:
            peak = self.torch.cuda.max_memory_allocated(self.device) - before
        else:
            peak = _status("VmHWM") - before
        return seconds, peak, out


class MLX:
    name = "mlx"

    def __init__(self, device: str | None = None):
        import mlx.core as mx

        from oxigaf_mlx.backend import MLXBackend

        self.mx = mx
        self.backend = MLXBackend(device=device)

    def describe(self) -> str:
        return str(self.mx.default_device())

    def sync(self, x=None):
        if x is not None:
            self.mx.eval(x)
        self.mx.synchronize()

    def randn(self, shape, dtype: str, seed: int):
        a = self.mx.array(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))
        return a.astype(getattr(self.mx, dtype))

    def free_bytes(self) -> int:
        return available_bytes()

    def measure(self, fn):
        gc.collect()
        self.mx.synchronize()
        self.mx.clear_cache()
        self.mx.reset_peak_memory()
        before = self.mx.get_active_memory()
        t0 = time.perf_counter()
        out = fn()
        self.sync(out)
        seconds = time.perf_counter() - t0
        return seconds, self.mx.get_peak_memory() - before, out


def make_backend(name: str, device: str | None = None):
    return {"torch": Torch, "mlx": MLX}[name](device)


def _median(xs):
    return float(statistics.median(xs)) if xs else None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


# --------------------------------------------------------------------------- attention


def attention_need(backend: str, mode: str, seq: int, dtype: str, cuda: bool) -> int:
    """Bytes a call needs at its peak, roughly (the inputs and output included)."""
    item = 2 if dtype in ("bfloat16", "float16") else 4
    io = 4 * BATCH * HEADS * seq * HEAD_DIM * item
    rows = {"naive": seq, "chunked": min(seq, CHUNK)}.get(mode, 0)
    if backend == "mlx" and mode == "sdpa" and not cuda:
        rows = seq  # no fused kernel on the CPU: the score matrix exists
    # torch keeps float32 scores (normalised in place when large; a half-precision product
    # is widened first); mlx makes the scores and the probabilities as separate arrays
    per = {"torch": 4 + (item if item == 2 else 0), "mlx": 2 * 4}[backend]
    return io + BATCH * HEADS * rows * seq * per


def attention(spec: dict):
    b = make_backend(spec["backend"], spec.get("device"))
    dtype, seq, mode = spec["dtype"], spec["seq"], spec["mode"]
    if b.name == "torch":
        from oxigaf_torch.common import attention as attend
    else:
        from oxigaf_mlx.common import attention as attend
    q, k, v = (b.randn((BATCH, HEADS, seq, HEAD_DIM), dtype, seed) for seed in range(3))
    # warm-up on a tiny slice: thread pools, kernels, allocator
    b.sync(attend(q[:, :, :64], k[:, :, :64], v[:, :, :64], mode, chunk_size=CHUNK))
    times, peak = [], 0
    budget = spec.get("budget_s", 10.0)
    while True:
        seconds, p, out = b.measure(lambda: attend(q, k, v, mode, chunk_size=CHUNK))
        del out
        times.append(seconds)
        # the first call in this process is the one whose peak is clean (see module doc)
        peak = p if len(times) == 1 else peak
        if sum(times) + seconds > budget or len(times) >= spec.get("max_runs", 5):
            break
    yield {"seq": seq, "mode": mode, "seconds": _median(times), "peak_bytes": int(peak), "runs": len(times),
           "device": b.describe()}


# --------------------------------------------------------------------------- UNet step

FRAMES, VIEWS, LATENT = 5, 4, 32


def unet_inputs(seed: int = 0, context_dim: int = 1024):
    """What the pipeline hands the UNet at 256 px with CFG: (uncond frames, cond frames), each
    group's text and CLIP states repeated per frame, zero CLIP states and reference latent for
    the unconditional group, a zero camera for the reference slot."""
    from oxigaf.cameras import camera_vectors, default_cameras

    rng = np.random.default_rng(seed)
    n = 2 * FRAMES
    x = rng.standard_normal((n, 4, LATENT, LATENT), dtype=np.float32)
    text = rng.standard_normal((2, 77, context_dim), dtype=np.float32)
    clip = rng.standard_normal((1, 257, 1280), dtype=np.float32)
    context = np.repeat(text, FRAMES, axis=0)
    ip = np.concatenate([np.zeros((FRAMES, 257, 1280), np.float32), np.repeat(clip, FRAMES, axis=0)])
    ip_img = np.concatenate([np.zeros((1, 4, LATENT, LATENT), np.float32),
                             rng.standard_normal((1, 4, LATENT, LATENT), dtype=np.float32)])
    cams = np.concatenate([camera_vectors(default_cameras(VIEWS, 0.0)), np.zeros((1, 16), np.float32)])
    camera = np.tile(cams, (2, 1)).astype(np.float32)
    t = np.full((n,), 501.0, np.float32)
    return {"x": x, "timesteps": t, "context": context, "camera": camera, "ip": ip, "ip_img": ip_img}


def _to_numpy(b, x) -> np.ndarray:
    return np.asarray(b.backend.to_numpy(x), dtype=np.float32)


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _preloaded_blas() -> bool:
    """mlx's process got OpenBLAS through LD_PRELOAD (run.py's default on a Linux CPU). It then
    also serves torch's own BLAS calls (the Linear layers), several times slower than MKL,
    so a torch baseline in that process would be wrong: run.py takes it from the torch process."""
    return "openblas" in os.environ.get("LD_PRELOAD", "")


def _alternate(variants: dict, rounds: int, backend: str = "torch") -> dict:
    """Time each variant once per round, in turn, so a busy machine slows them alike.

    With mlx the torch baseline's rounds come first and mlx's after: OpenBLAS's idle worker
    threads (when preloaded for mlx) spin for a while after each mlx call and would slow the
    torch call that follows."""
    if backend == "mlx":
        base = {k: v for k, v in variants.items() if k.startswith("base:")}
        ours = {k: v for k, v in variants.items() if not k.startswith("base:")}
        return {**_alternate(base, rounds), **_alternate(ours, rounds)}
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def unet_step(spec: dict):
    import assets

    b = make_backend(spec["backend"], spec.get("device"))
    dtypes = spec["dtypes"]
    model = spec.get("model", "imagedream")
    if model == "demo":  # the demo model's shape: 64 channels, 32-wide heads, 64-wide context
        from oxigaf.demo import tiny_model

        folder, context_dim = tiny_model()[0] / "unet", 64
    else:
        folder, context_dim = assets.component("unet"), 1024
    raw = unet_inputs(context_dim=context_dim)
    ours, ins, caches = {}, {}, {}
    extra = {"compile": True} if spec.get("compiled") else {}
    # mlx's CPU default (chunked) evaluates as it goes and stays eager under compile: sdpa there
    attention = "sdpa" if spec.get("compiled") and b.name == "mlx" else "auto"
    for dt in dtypes:
        ours[dt] = b.backend.load_unet(folder, dtype=dt, attention=attention, **extra)
        ins[dt] = {k: b.backend.asarray(v, dtype=dt) for k, v in raw.items() if k != "timesteps"}
        ins[dt]["timesteps"] = b.backend.asarray(raw["timesteps"], dtype="float32")
        # what the pipeline does once per generation: the step-invariant conditioning work
        caches[dt] = _prepare(b, ours[dt], ins[dt])

    def ours_fn(dt):
        def run():
            out = ours[dt](ins[dt]["x"], ins[dt]["timesteps"], num_frames=FRAMES, ip_img=ins[dt]["ip_img"],
                           cache=caches[dt])
            b.sync(out)
            return out
        return run

    variants = {f"ours:{dt}": ours_fn(dt) for dt in dtypes}
    base_note = None
    try:
        if _preloaded_blas():
            raise ImportError("OpenBLAS preloaded in this process")
        import baseline
        import torch

        tb = b if b.name == "torch" else make_backend("torch", spec.get("baseline_device"))
        # the baseline runs in each dtype of ours, and in float32 for the half-precision ratios
        for dt in dtypes + [d for d in ("float32",) if d not in dtypes]:
            base_model = baseline.build(getattr(torch, dt), tb.device, FRAMES, config=model)
            bx = tb.randn((2 * FRAMES, 4, LATENT, LATENT), dt, 0)
            bt = torch.full((2 * FRAMES,), 501.0, device=tb.device)
            bc = torch.from_numpy(raw["context"]).to(tb.device, getattr(torch, dt))

            def base_run(model=base_model, bx=bx, bt=bt, bc=bc):
                out = baseline.call(model, bx, bt, bc)
                tb.sync(out)
                return out
            variants[f"base:{dt}"] = base_run
    except ImportError as exc:
        base_note = f"baseline not run: {exc}"

    warm, first = {}, {}
    for k, fn in variants.items():  # first calls: kernel selection, allocator; compiling
        start = time.perf_counter()
        warm[k] = fn()
        first[k] = time.perf_counter() - start
    eps = {dt: _to_numpy(b, warm[f"ours:{dt}"]) for dt in dtypes}
    del warm
    # compiled rows: how far the compiled graph's output is from the same model run eager
    eager_eps = {dt: _eager_output(b, ours[dt], ours_fn(dt)) for dt in dtypes} if spec.get("compiled") else {}
    # rows with Winograd convolutions: how far they are from the same model's direct ones
    winograd = {dt: _uses_winograd(b, ours[dt]) and not spec.get("compiled") for dt in dtypes}
    direct_eps = {dt: _direct_output(b, ours[dt], ours_fn(dt)) for dt in dtypes if winograd[dt]}
    gc.collect()
    rounds = spec.get("rounds", 3)
    times = _alternate(variants, rounds, b.name)
    med = {k: _median(v) for k, v in times.items()}
    for dt in dtypes:
        r = {"dtype": dt, "model": model, "compiled": bool(spec.get("compiled")), "cached": True,
             "frames": 2 * FRAMES, "latent": LATENT, "seconds": med[f"ours:{dt}"],
             "baseline_seconds": med.get(f"base:{dt}"), "runs": rounds, "device": b.describe(),
             "times": times[f"ours:{dt}"], "baseline_times": times.get(f"base:{dt}")}
        r["ratio"] = r["seconds"] / r["baseline_seconds"] if r["baseline_seconds"] else None
        if dt != "float32" and "base:float32" in med:
            r["baseline_float32_seconds"] = med["base:float32"]
            r["ratio_vs_float32_baseline"] = r["seconds"] / med["base:float32"]
        if dt != "float32" and "float32" in eps:
            r["eps_rel_l2_vs_float32"] = _rel_l2(eps[dt], eps["float32"])
        if dt in eager_eps:
            r["first_call_seconds"] = first[f"ours:{dt}"]
            r["eps_rel_l2_vs_eager"] = _rel_l2(eps[dt], eager_eps[dt])
        if b.name == "torch":
            r["winograd"] = winograd[dt]
        if dt in direct_eps:
            r["eps_rel_l2_vs_direct"] = _rel_l2(eps[dt], direct_eps[dt])
        if base_note:
            r["note"] = base_note
        elif attention != "auto":
            r["note"] = f"attention {attention}"
        if b.name == "mlx":
            r["baseline_backend"] = "torch"
        yield r


def _eager_output(b, unet, run) -> np.ndarray:
    """``run()``'s output with the compiled graph of ``unet`` set aside (the same weights)."""
    if b.name == "torch":
        body, unet.compiled_blocks = unet.compiled_blocks, None
        try:
            return _to_numpy(b, run())
        finally:
            unet.compiled_blocks = body
    unet.compiled = False
    try:
        return _to_numpy(b, run())
    finally:
        unet.compiled = True


def _uses_winograd(b, unet) -> bool:
    """Whether a torch model runs Winograd convolutions: switched on and wide enough for them
    (an eager call: a compiled graph has the direct ones)."""
    if b.name != "torch":
        return False
    from oxigaf_torch.fast import winograd

    return any(m.winograd for m in winograd.wide_layers(unet))


def _direct_output(b, unet, run) -> np.ndarray:
    """``run()``'s output with ``unet``'s Winograd convolutions switched off (torch)."""
    from oxigaf_torch.fast import winograd

    winograd.enable(unet, False)
    try:
        return _to_numpy(b, run())
    finally:
        winograd.enable(unet, True)


def _prepare(b, unet, kw: dict):
    """``unet.prepare`` under no autograd (torch) for the call's conditioning inputs."""
    args = (kw["context"], kw["camera"], FRAMES, kw["ip"])
    if b.name == "torch":
        import torch

        with torch.no_grad():
            return unet.prepare(*args)
    return unet.prepare(*args)


# --------------------------------------------------------------------------- DDIM step


def ddim_step(spec: dict):
    """One deterministic DDIM step on (10, 4, 32, 32) arrays of the backend; baseline: diffusers'
    DDIMScheduler.step on torch CPU tensors of the same shape (same config, same process)."""
    import json

    from oxigaf.demo import DATA
    from oxigaf.schedulers import DDIMScheduler

    config = json.loads((DATA / "imagedream" / "scheduler" / "scheduler_config.json").read_text())
    shape = (2 * FRAMES, 4, LATENT, LATENT)
    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(50)
    t = int(sched.timesteps[10])
    reps = spec.get("reps", 200)
    if spec["backend"] == "numpy":
        rng = np.random.default_rng(0)
        eps, x = rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)

        def ours():
            return sched.step(eps, t, x)
        device = "cpu (numpy)"
        sync = None
    else:
        b = make_backend(spec["backend"], spec.get("device"))
        eps, x = b.randn(shape, "float32", 0), b.randn(shape, "float32", 1)

        def ours():
            out = sched.step(eps, t, x)
            b.sync(out)
            return out
        device = b.describe()
        sync = b.sync
    variants = {"ours": ours}
    if spec["backend"] != "numpy":
        # what the loop does per step: guidance over both branches (2x the frames), then the step;
        # compiled: the one function of the compiled loop (DiffusionConfig.compile), where the
        # backend compiles functions
        from oxigaf.pipeline import guide, guided_ddim_update

        eps2 = b.randn((2 * shape[0],) + shape[1:], "float32", 2)

        def ours_guided():
            out = sched.step(guide(eps2, shape[0], 5.0), t, x)
            b.sync(out)
            return out
        variants["guided"] = ours_guided
        compile_function = getattr(b.backend, "compile_function", None)
        if compile_function is not None:
            fused = compile_function(guided_ddim_update)
            scalars = [b.backend.asarray(np.float32(v)) for v in (5.0, *sched.linear_weights(t))]

            def ours_compiled():
                out = fused(eps2, x, *scalars)
                b.sync(out)
                return out
            variants["guided_compiled"] = ours_compiled
    try:
        import torch
        from diffusers import DDIMScheduler as Reference

        ref = Reference.from_config(config)
        ref.set_timesteps(50)
        te, tx = torch.randn(shape), torch.randn(shape)

        def base():
            return ref.step(te, t, tx).prev_sample
        variants["base"] = base
        te2 = torch.randn((2 * shape[0],) + shape[1:])

        def base_guided():
            return ref.step(te2[:shape[0]] + 5.0 * (te2[shape[0]:] - te2[:shape[0]]), t, tx).prev_sample
        variants["base_guided"] = base_guided
    except ImportError:
        pass
    for fn in variants.values():
        fn()
    times = {k: [] for k in variants}
    for _ in range(reps):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    del sync
    for name, base, guided, compiled in (("ours", "base", False, False), ("guided", "base_guided", True, False),
                                         ("guided_compiled", "base_guided", True, True)):
        if name not in times:
            continue
        r = {"dtype": "float32", "shape": list(shape), "guided": guided, "compiled": compiled,
             "seconds": _median(times[name]), "runs": reps, "device": device}
        if base in times:
            r["baseline_seconds"] = _median(times[base])
            r["ratio"] = r["seconds"] / r["baseline_seconds"]
            r["baseline_backend"] = "torch-cpu (diffusers)"
        yield r


# --------------------------------------------------------------------------- VAE decode


def vae_decode(spec: dict):
    """Decode one latent (1, 4, s/8, s/8) to an s×s image with the real-shape random SD VAE;
    baseline: diffusers' AutoencoderKL with the same config and weights, same process."""
    import assets

    b = make_backend(spec["backend"], spec.get("device"))
    folder = assets.component("vae")
    dtype = spec["dtype"]
    vae = b.backend.load_vae(folder, dtype=dtype)
    results = []
    variants, sizes = {}, spec["sizes"]
    latents = {s: np.random.default_rng(s).standard_normal((1, 4, s // 8, s // 8), dtype=np.float32) for s in sizes}
    for s in sizes:
        z = b.backend.asarray(latents[s], dtype=dtype)

        def ours(z=z):
            out = vae.decode(z)
            b.sync(out)
            return out
        variants[f"ours:{s}"] = ours
    ref = None
    try:
        if _preloaded_blas():
            raise ImportError("OpenBLAS preloaded in this process")
        import json

        import torch
        from diffusers import AutoencoderKL

        from oxigaf.checkpoints import load_state

        tb = b if b.name == "torch" else make_backend("torch", spec.get("baseline_device"))
        config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}
        ref = AutoencoderKL(**config)
        ref.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in load_state(folder).items()})
        ref = ref.to(tb.device, getattr(torch, dtype)).eval().requires_grad_(False)
        for s in sizes:
            z = torch.from_numpy(latents[s]).to(tb.device, getattr(torch, dtype))

            def base(z=z):
                out = ref.decode(z).sample
                tb.sync(out)
                return out
            variants[f"base:{s}"] = base
    except ImportError:
        pass
    warm = {k: fn() for k, fn in variants.items()}
    diff = {}
    for s in sizes:
        if f"base:{s}" in warm:
            diff[s] = _rel_l2(_to_numpy(b, warm[f"ours:{s}"]), warm[f"base:{s}"].float().cpu().numpy())
    del warm
    rounds = spec.get("rounds", 3)
    times = _alternate(variants, rounds, b.name)
    for s in sizes:
        r = {"dtype": dtype, "size": s, "batch": 1, "seconds": _median(times[f"ours:{s}"]), "runs": rounds,
             "device": b.describe()}
        if f"base:{s}" in times:
            r["baseline_seconds"] = _median(times[f"base:{s}"])
            r["ratio"] = r["seconds"] / r["baseline_seconds"]
            r["rel_l2_vs_baseline"] = diff[s]
        results.append(r)
    yield from results


# --------------------------------------------------------------------------- whole pipeline


def _users_grad_mode(b):
    """torch's grad mode as a user of the pipeline has it: on (torch's default; TorchBench turns it
    off for the model-level rows). The pipeline-level rows run in it, so they time what users get."""
    return b.torch.enable_grad() if b.name == "torch" else contextlib.nullcontext()


def pipeline(spec: dict):
    """Load the real-shape random ImageDream folder and generate 4 views at 256 px with CFG."""
    import assets

    from oxigaf import DiffusionConfig, Pipeline
    from oxigaf.demo import bundled_portrait

    folder = assets.pipeline_folder()
    b = make_backend(spec["backend"], spec.get("device"))
    steps, dtype = spec["steps"], spec["dtype"]
    rss0 = _status("VmRSS")
    with _users_grad_mode(b):
        t0 = time.perf_counter()
        pipe = Pipeline(folder, backend=b.backend, config=DiffusionConfig(num_inference_steps=steps, dtype=dtype))
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = pipe.generate(bundled_portrait(), progress=False, seed=0)
        total = time.perf_counter() - t0
    stages = {k: float(v) for k, v in out.timings.items()}
    r = {"dtype": dtype, "steps": steps, "views": len(out.views), "size": out.views[0].size[0],
         "seconds": total, "load_seconds": load, "stages": stages,
         "seconds_per_step": stages.get("denoising", 0.0) / steps,
         "peak_rss_bytes": peak_rss_bytes(), "rss_before_load_bytes": rss0, "device": b.describe(),
         "finite": bool(np.isfinite(out.images).all())}
    peak = out.memory.get("peak_bytes") if isinstance(getattr(out, "memory", None), dict) else None
    if peak:
        r["backend_peak_bytes"] = int(peak)
    yield r


def pipeline_512(spec: dict):
    """The whole path at 512 px: 4 views at 256 px (``steps`` DDIM steps, CFG 5), the real-shape
    sd-x2 latent upsampler (``upsampler_steps`` Euler steps, GAF's 10), the VAE at 512 px."""
    import assets

    from oxigaf import DiffusionConfig, Pipeline
    from oxigaf.demo import bundled_portrait

    b = make_backend(spec["backend"], spec.get("device"))
    steps, dtype = spec["steps"], spec["dtype"]
    config = DiffusionConfig(num_inference_steps=steps, dtype=dtype, upsampler_steps=spec["upsampler_steps"])
    with _users_grad_mode(b):
        t0 = time.perf_counter()
        pipe = Pipeline(assets.pipeline_folder(), backend=b.backend, config=config, upsampler=assets.upscaler_folder())
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = pipe.generate(bundled_portrait(), output_size=2 * pipe.native_size, progress=False, seed=0)
        total = time.perf_counter() - t0
    stages = {k: float(v) for k, v in out.timings.items()}
    yield {"dtype": dtype, "steps": steps, "upsampler_steps": spec["upsampler_steps"], "views": len(out.views),
           "size": out.views[0].size[0], "seconds": total, "load_seconds": load, "stages": stages,
           "seconds_per_step": stages.get("denoising", 0.0) / steps,
           "seconds_50_steps_estimate": total + (50 - steps) * stages.get("denoising", 0.0) / steps,
           "peak_rss_bytes": peak_rss_bytes(), "device": b.describe(),
           "finite": bool(np.isfinite(out.images).all())}


def refine(spec: dict):
    """A GAF-style refinement call at real shapes (4 views at 256 px, CFG 5): the photo's conditioning
    computed once and reused, against passing the photo (re-encoded) every call. ``strength`` of a
    50-step grid (GAF: t/1000); the --quick run uses few steps to stay within minutes."""
    import assets

    from oxigaf import DiffusionConfig, Pipeline
    from oxigaf.demo import bundled_portrait

    b = make_backend(spec["backend"], spec.get("device"))
    pipe = Pipeline(assets.pipeline_folder(), backend=b.backend, config=DiffusionConfig(dtype=spec["dtype"]))
    photo = bundled_portrait()
    renders = np.random.default_rng(0).random((4, pipe.native_size, pipe.native_size, 3), dtype=np.float32)
    kw = dict(strength=spec["strength"], num_inference_steps=50, seed=0, progress=False)
    cond = pipe.condition(photo)
    times = {"cached": [], "photo": []}
    for _ in range(spec["rounds"]):  # alternate, so a busy machine slows both alike
        for name, image in (("cached", cond), ("photo", photo)):
            t0 = time.perf_counter()
            with _users_grad_mode(b):
                pipe.refine(renders, image, None, **kw)
            times[name].append(time.perf_counter() - t0)
    cached, photo_s = _median(times["cached"]), _median(times["photo"])
    yield {"strength": spec["strength"], "denoising_steps": min(int(50 * spec["strength"]), 50),
           "seconds": cached, "baseline_seconds": photo_s, "ratio": cached / photo_s,
           "peak_rss_bytes": peak_rss_bytes(), "device": b.describe()}


# --------------------------------------------------------------------------- training step

# A mid-size ImageDream UNet (the test fixtures' geometry: 4 levels, 64 channels): what a CPU
# can train in seconds per step. "real" is the published geometry (random weights).
SMALL_UNET = {
    "_class_name": "MultiViewUNetModel", "image_size": 32, "in_channels": 4, "model_channels": 64,
    "out_channels": 4, "num_res_blocks": 2, "attention_resolutions": [4, 2, 1], "channel_mult": [1, 1, 1, 2],
    "num_head_channels": 32, "context_dim": 64, "camera_dim": 16, "transformer_depth": 1, "ip_dim": 16,
}


def train_state_bytes(params: int, lora_params: int = 0) -> int:
    """float32 AdamW state of a run: weights, and for what trains gradients + two moments."""
    trained = lora_params if lora_params else params
    return 4 * (params + lora_params) + 12 * trained


def _train_model(which: str):
    import json as _json

    from oxigaf.config import UNetConfig

    if which == "real":
        import assets

        from oxigaf.checkpoints import load_state

        folder = assets.component("unet")
        cfg = UNetConfig.from_folder(folder)
        state = {k: np.asarray(v, np.float32) for k, v in load_state(folder).items()}
        return cfg, state
    cfg = UNetConfig.from_dict(dict(SMALL_UNET), "small")
    shapes = _json.loads(_json.dumps(_unet_shapes(cfg)))
    import assets

    state = {k: np.asarray(v, np.float32) for k, v in assets.random_weights(shapes, 0).items()}
    return cfg, state


def _unet_shapes(cfg) -> dict:
    import torch

    from oxigaf_torch.unet import MultiViewUNet

    with torch.device("meta"):
        model = MultiViewUNet(cfg)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def train_batch(cfg, batch: int, latent: int, seed: int = 0):
    """One ImageDream training batch (4 targets + the reference slot per sample), numpy."""
    from oxigaf.cameras import camera_vectors, default_cameras
    from oxigaf.training import Batch

    rng = np.random.default_rng(seed)
    n = batch * FRAMES
    cams = np.concatenate([camera_vectors(default_cameras(VIEWS, 0.0)), np.zeros((1, 16), np.float32)])
    clip = np.repeat(rng.standard_normal((batch, 257, 1280), dtype=np.float32), FRAMES, axis=0)
    text = np.repeat(rng.standard_normal((batch, 77, cfg.context_dim), dtype=np.float32), FRAMES, axis=0)
    return Batch(x=rng.standard_normal((n, cfg.in_channels, latent, latent), dtype=np.float32),
                 timesteps=np.repeat(rng.integers(0, 1000, batch), FRAMES).astype(np.float32), context=text,
                 camera=np.tile(cams, (batch, 1)).astype(np.float32), ip=clip,
                 ip_img=rng.standard_normal((batch, 4, latent, latent), dtype=np.float32),
                 target=rng.standard_normal((batch, VIEWS, 4, latent, latent), dtype=np.float32),
                 num_frames=FRAMES, views=VIEWS)


def train_step(spec: dict):
    """Seconds per optimiser step (forward + backward + AdamW) and peak memory, full and LoRA."""
    from oxigaf.training.lora import init_lora, lora_targets

    b = make_backend(spec["backend"], spec.get("device"))
    if b.name == "torch":
        b.torch.set_grad_enabled(True)  # the harness turns autograd off for the inference cases
    cfg, state = _train_model(spec["model"])
    latent = spec.get("latent", 32)
    batch = train_batch(cfg, spec.get("batch", 1), latent)
    params = sum(int(np.prod(v.shape)) for v in state.values())
    lora = None
    lora_params = 0
    if spec.get("lora_rank"):
        shapes = {k: v.shape for k, v in state.items()}
        targets = lora_targets(shapes)
        tensors = init_lora(shapes, targets, spec["lora_rank"], np.random.default_rng(0))
        lora = {"targets": targets, "scale": 1.0, "tensors": tensors}
        lora_params = sum(int(np.prod(v.shape)) for v in tensors.values())
    _reset_peak_rss()
    if b.name == "torch" and b.backend.torch_device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    trainer = b.backend.unet_trainer(cfg, state, dtype=spec["dtype"], lora=lora,
                                     grad_checkpointing=spec.get("grad_checkpointing", False))
    del state
    gc.collect()
    times = []
    for _ in range(spec.get("rounds", 2) + 1):  # the first step warms up (allocator, kernels)
        t0 = time.perf_counter()
        loss = trainer.step([batch], 1e-5, 1.0)
        b.sync()
        times.append(time.perf_counter() - t0)
    seconds = _median(times[1:])
    mem = b.backend.memory()
    r = {"model": spec["model"], "params": params, "lora_rank": spec.get("lora_rank", 0),
         "grad_checkpointing": spec.get("grad_checkpointing", False), "batch": spec.get("batch", 1),
         "frames": FRAMES * spec.get("batch", 1), "latent": latent, "seconds": seconds, "times": times,
         "samples_per_second": spec.get("batch", 1) / seconds, "loss": loss, "device": b.describe(),
         "state_bytes_estimate": train_state_bytes(params, lora_params), "peak_rss_bytes": peak_rss_bytes()}
    if mem.get("peak_bytes"):
        r["peak_bytes"] = int(mem["peak_bytes"])
    yield r


CASES = {"attention": attention, "unet_step": unet_step, "ddim_step": ddim_step, "vae_decode": vae_decode,
         "pipeline": pipeline, "pipeline_512": pipeline_512, "refine": refine, "train_step": train_step}


def run_case(spec: dict):
    for r in CASES[spec["bench"]](spec):
        yield {"bench": spec["bench"], "backend": spec["backend"], "dtype": spec.get("dtype"), **r}

