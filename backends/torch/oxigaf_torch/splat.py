"""3D Gaussian splatting in torch: the original 3DGS rasteriser's rules, dense, differentiable.

``rasterize`` follows the rules REFERENCE.md lists (camera depth < 0.01 dropped; EWA 2D
covariance J W Σ Wᵀ Jᵀ + 0.3·I with 3DGS's clamp of x/z, y/z to 1.3·tan(fov/2) inside J; pixel
centres at +0.5; alpha = min(0.99, o·exp(−½ dᵀΣ⁻¹d)), skipped below 1/255; front to back by
depth; the Gaussian that would take T below 1e-4 ends the pixel unadded; C += T·background).

It is dense: every pixel of a tile against every Gaussian whose alpha can reach 1/255 there.
That cull is exact, not 3DGS's 3σ box: o·exp(−q/2) ≥ 1/255 needs q ≤ 2·ln(255·o), which bounds
|dx| by sqrt(2·ln(255·o)·Σxx) (and |dy| alike). Compositing runs over depth-sorted chunks of
Gaussians with the transmittance carried in log space, so memory stays at tile × chunk.
On CUDA with gsplat installed, ``rasterize`` hands the work to ``gsplat.rasterization``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from oxigaf.splat.rules import ALPHA_MAX, ALPHA_MIN, EPS2D, GROUPS, LOG_T_MIN, NEAR, PAIRS, TILE


def quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    """(N, 4) quaternions (w, x, y, z), normalised here, to (N, 3, 3) rotation matrices."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(-1, 3, 3)


def project(means, scales, quats, viewmats, k, width: int, height: int):
    """Per view and Gaussian: pixel means (V, N, 2), conics (V, N, 3: a, b, c of Σ₂D⁻¹),
    2D variances (V, N, 2), depths (V, N), valid (V, N)."""
    fx, fy, cx, cy = k
    rot_w, t_w = viewmats[:, :3, :3], viewmats[:, :3, 3]
    p = torch.einsum("vij,nj->vni", rot_w, means) + t_w[:, None, :]
    x, y, z = p.unbind(-1)
    valid = z >= NEAR
    zs = torch.where(valid, z, torch.ones_like(z))
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    tx = zs * torch.clamp(x / zs, -(cx / fx + 0.3 * tan_x), (width - cx) / fx + 0.3 * tan_x)
    ty = zs * torch.clamp(y / zs, -(cy / fy + 0.3 * tan_y), (height - cy) / fy + 0.3 * tan_y)
    zero = torch.zeros_like(zs)
    jac = torch.stack([fx / zs, zero, -fx * tx / (zs * zs), zero, fy / zs, -fy * ty / (zs * zs)], -1)
    m = quat_to_rotmat(quats) * scales[:, None, :]  # R S
    tm = jac.reshape(*zs.shape, 2, 3) @ rot_w[:, None] @ m[None]  # J W R S
    cov = tm @ tm.transpose(-1, -2)
    a, b, c = cov[..., 0, 0] + EPS2D, cov[..., 0, 1], cov[..., 1, 1] + EPS2D
    det = a * c - b * b
    conic = torch.stack([c / det, -b / det, a / det], -1)
    mean2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], -1)
    return mean2d, conic, torch.stack([a, c], -1), z, valid & (det > 0)


def _tile_table(mean2d, var2d, depth, valid, opacities, width: int, height: int):
    """(V·tiles, K) indices into the views' Gaussians flattened (V·N; V·N is a transparent pad)
    that can reach each TILE×TILE tile, depth-ordered; the tile grid's shape."""
    v, n = depth.shape
    dev = depth.device
    o = opacities.detach()
    qmax = 2.0 * torch.log(torch.clamp(255.0 * o, min=1.0))
    rad = torch.sqrt(qmax[None, :, None] * var2d) * 1.001 + 1e-3
    keep = valid & (o >= ALPHA_MIN)[None]
    order = torch.argsort(torch.where(keep, depth, torch.full_like(depth, math.inf)), dim=1, stable=True)
    m = torch.gather(mean2d, 1, order[..., None].expand(v, n, 2))
    rad = torch.gather(rad, 1, order[..., None].expand(v, n, 2))
    keep = torch.gather(keep, 1, order)
    lo, hi = m - rad, m + rad
    ty, tx = -(-height // TILE), -(-width // TILE)
    r0 = torch.arange(ty, device=dev) * TILE + 0.5
    r1 = torch.clamp((torch.arange(ty, device=dev) + 1) * TILE, max=height) - 0.5
    c0 = torch.arange(tx, device=dev) * TILE + 0.5
    c1 = torch.clamp((torch.arange(tx, device=dev) + 1) * TILE, max=width) - 0.5
    rows = (hi[:, None, :, 1] >= r0[None, :, None]) & (lo[:, None, :, 1] <= r1[None, :, None])  # (V, ty, N)
    cols = (hi[:, None, :, 0] >= c0[None, :, None]) & (lo[:, None, :, 0] <= c1[None, :, None])  # (V, tx, N)
    overlap = (rows[:, :, None] & cols[:, None] & keep[:, None, None]).reshape(v * ty * tx, n)
    count = max(int(overlap.sum(-1).max()), 1) if n else 1
    slot = torch.where(overlap, overlap.cumsum(-1) - 1, torch.full_like(order[:1].expand(len(overlap), n), count))
    src = (order + torch.arange(v, device=dev)[:, None] * n)[:, None, None].expand(v, ty, tx, n).reshape(-1, n)
    table = torch.full((len(overlap), count + 1), v * n, dtype=torch.long, device=dev)
    table.scatter_(1, slot, src)
    return table[:, :count], (ty, tx)


def _composite(px, py, mean2d, conic, opac, colors, background: float):
    """Front-to-back compositing: pixel centres (B, P) against depth-ordered Gaussians (B, K, ...)."""
    shape = px.shape
    color = torch.zeros(*shape, 3, dtype=colors.dtype, device=colors.device)
    log_t = torch.zeros(shape, dtype=colors.dtype, device=colors.device)
    done = torch.zeros(shape, dtype=torch.bool, device=colors.device)
    step = max(16, PAIRS // max(shape[0] * shape[1], 1))
    for g0 in range(0, mean2d.shape[1], step):
        sl = slice(g0, g0 + step)
        dx = px[:, :, None] - mean2d[:, None, sl, 0]
        dy = py[:, :, None] - mean2d[:, None, sl, 1]
        a, b, c = (t[:, None] for t in conic[:, sl].unbind(-1))
        power = -0.5 * (a * dx * dx + c * dy * dy) - b * dx * dy
        alpha = torch.clamp(opac[:, None, sl] * torch.exp(power), max=ALPHA_MAX)
        alpha = torch.where((alpha >= ALPHA_MIN) & (power <= 0), alpha, torch.zeros_like(alpha))
        lg = torch.log1p(-alpha)
        cum = log_t[..., None] + torch.cumsum(lg, -1)  # log T after each Gaussian, were all added
        added = (cum >= LOG_T_MIN) & ~done[..., None]
        weight = torch.where(added, alpha * torch.exp(cum - lg), torch.zeros_like(alpha))
        color = color + weight @ colors[:, sl]
        done = done | ((alpha > 0) & ~added).any(-1)
        log_t = log_t + torch.where(added, lg, torch.zeros_like(lg)).sum(-1)
    return color + torch.exp(log_t)[..., None] * background


def _gsplat():
    try:
        from gsplat import rasterization
    except ImportError:
        return None
    return rasterization


def rasterize(means, scales, quats, opacities, colors, viewmats, k, width: int, height: int, background=1.0):
    """(V, height, width, 3) renders of the Gaussians from world-to-camera ``viewmats`` (V, 4, 4,
    OpenCV axes) with pinhole ``k`` = (fx, fy, cx, cy); differentiable in every Gaussian tensor."""
    if means.is_cuda and means.dtype == torch.float32 and (rasterization := _gsplat()) is not None:
        fx, fy, cx, cy = k
        ks = torch.tensor([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=means.dtype, device=means.device)
        out, _, _ = rasterization(means, quats, scales, opacities, colors, viewmats,
                                  ks[None].expand(len(viewmats), 3, 3), width, height, near_plane=NEAR, eps2d=EPS2D,
                                  rasterize_mode="classic",
                                  backgrounds=torch.full((len(viewmats), 3), float(background), device=means.device))
        return out
    v, n = len(viewmats), means.shape[0]
    mean2d, conic, var2d, depth, valid = project(means, scales, quats, viewmats, k, width, height)
    with torch.no_grad():
        table, (ty, tx) = _tile_table(mean2d.detach(), var2d.detach(), depth.detach(), valid, opacities, width, height)
    pad = lambda t, fill: torch.cat([t.reshape(v * n, -1), torch.full_like(t.reshape(v * n, -1)[:1], fill)])  # noqa: E731
    m2, op, col = pad(mean2d, 0.0), pad(opacities[None].expand(v, n), 0.0)[:, 0], pad(colors[None].expand(v, n, 3), 0.0)
    cn = torch.cat([conic.reshape(v * n, 3), torch.tensor([[1.0, 0.0, 1.0]], dtype=conic.dtype, device=conic.device)])
    grid = torch.arange(TILE, dtype=means.dtype, device=means.device) + 0.5
    px = (torch.arange(tx, dtype=means.dtype, device=means.device)[:, None] * TILE + grid)  # (tx, TILE)
    py = (torch.arange(ty, dtype=means.dtype, device=means.device)[:, None] * TILE + grid)  # (ty, TILE)
    px = px[None, None, :, None, :].expand(v, ty, tx, TILE, TILE).reshape(v * ty * tx, TILE * TILE)
    py = py[None, :, None, :, None].expand(v, ty, tx, TILE, TILE).reshape(v * ty * tx, TILE * TILE)
    # Tiles in groups of similar Gaussian counts, each padded only to its own longest list.
    counts = (table < v * n).sum(1)
    order = torch.argsort(counts)
    parts = []
    for tiles in torch.tensor_split(order, min(GROUPS, len(order))):
        sub = table[tiles, :max(int(counts[tiles].max()), 1)]
        parts.append(_composite(px[tiles], py[tiles], m2[sub], cn[sub], op[sub], col[sub], background))
    out = torch.cat(parts)[torch.argsort(order)]
    out = out.reshape(v, ty, tx, TILE, TILE, 3).permute(0, 1, 3, 2, 4, 5).reshape(v, ty * TILE, tx * TILE, 3)
    return out[:, :height, :width]


def render_gaussians(device, gaussians: dict, viewmats, k, size: int):
    """The Backend hook: numpy arrays or tensors in (tensors keep their graph), a tensor out."""
    t = {n: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v, np.float32), device=device)
         for n, v in gaussians.items()}
    vm = torch.as_tensor(np.asarray(viewmats, np.float32), device=t["means"].device, dtype=t["means"].dtype)
    return rasterize(t["means"], t["scales"], t["quats"], t["opacities"], t["colors"], vm, k, size, size)


# --------------------------------------------------------------------------- fitting


def _ssim_window(dtype, device, size: int = 11, sigma: float = 1.5):
    x = torch.arange(size, dtype=dtype, device=device) - size // 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(3, 1, size, size).contiguous()


def ssim(img1, img2, window):
    """3DGS's ``ssim``: (B, 3, H, W), 11×11 Gaussian window σ 1.5, zero padding, mean over all."""
    pad = window.shape[-1] // 2
    mu1, mu2 = F.conv2d(img1, window, padding=pad, groups=3), F.conv2d(img2, window, padding=pad, groups=3)
    s11 = F.conv2d(img1 * img1, window, padding=pad, groups=3) - mu1 * mu1
    s22 = F.conv2d(img2 * img2, window, padding=pad, groups=3) - mu2 * mu2
    s12 = F.conv2d(img1 * img2, window, padding=pad, groups=3) - mu1 * mu2
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return (((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 * mu1 + mu2 * mu2 + c1) * (s11 + s22 + c2))).mean()


class GaussianTrainer:
    """Adam on 0.8·L1 + 0.2·(1 − SSIM) of renders against target frames (3DGS's loss).

    Parameters are raw: means, log-scales, quaternions, opacity logits, colour logits.
    """

    NAMES = ("means", "log_scales", "quats", "opacity_logits", "color_logits")

    def __init__(self, device, raw: dict, targets: np.ndarray, viewmats: np.ndarray, k, size: int,
                 lrs: dict, lambda_dssim: float = 0.2):
        self.device, self.k, self.size, self.lrs = device, tuple(k), int(size), dict(lrs)
        self.lambda_dssim = lambda_dssim
        self.window = _ssim_window(torch.float32, device)
        self.set_targets(targets, viewmats)
        self.set_params(raw)

    def set_targets(self, targets: np.ndarray, viewmats: np.ndarray) -> None:
        self.targets = torch.as_tensor(np.asarray(targets, np.float32), device=self.device)
        self.viewmats = torch.as_tensor(np.asarray(viewmats, np.float32), device=self.device)

    def set_params(self, raw: dict) -> None:
        """Replace the parameters (after densify/prune); Adam's moments start afresh."""
        self.params = {n: torch.tensor(np.asarray(raw[n], np.float32), device=self.device, requires_grad=True)
                       for n in self.NAMES}
        self.opt = torch.optim.Adam([{"params": [p], "lr": self.lrs[n], "name": n} for n, p in self.params.items()],
                                    eps=1e-15)

    def set_lr(self, name: str, lr: float) -> None:
        for group in self.opt.param_groups:
            if group["name"] == name:
                group["lr"] = lr

    def _render(self, viewmats):
        p = self.params
        return rasterize(p["means"], torch.exp(p["log_scales"]), p["quats"], torch.sigmoid(p["opacity_logits"]),
                         torch.sigmoid(p["color_logits"]), viewmats, self.k, self.size, self.size)

    def step(self, frames) -> dict:
        """One Adam step on the given frame indices; returns the loss and each parameter's gradient norm."""
        idx = torch.as_tensor(np.asarray(frames, np.int64), device=self.device)
        self.opt.zero_grad(set_to_none=True)
        pred = self._render(self.viewmats[idx]).permute(0, 3, 1, 2)
        gt = self.targets[idx].permute(0, 3, 1, 2)
        dssim = 1 - ssim(pred, gt, self.window)
        loss = (1 - self.lambda_dssim) * (pred - gt).abs().mean() + self.lambda_dssim * dssim
        loss.backward()
        grad_means = self.params["means"].grad.detach().norm(dim=-1).cpu().numpy()
        self.opt.step()
        return {"loss": float(loss.detach()), "grad_means": grad_means}

    def raw(self) -> dict:
        return {n: p.detach().cpu().numpy().copy() for n, p in self.params.items()}

    def render(self, viewmats: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self._render(torch.as_tensor(np.asarray(viewmats, np.float32), device=self.device)).cpu().numpy()
