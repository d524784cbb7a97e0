"""3D Gaussian splatting in MLX: the original 3DGS rasteriser's rules, dense, differentiable.

The same algorithm as ``oxigaf_torch.splat`` (its docstring states the rules and the exact alpha
cull): the tile table (cull and depth order) is computed eagerly in numpy (it carries no gradient) and
the Gaussians each tile needs are gathered, so ``mx.grad`` sees plain gathers and arithmetic.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from oxigaf.splat.rules import ALPHA_MAX, ALPHA_MIN, EPS2D, GROUPS, LOG_T_MIN, NEAR, PAIRS, TILE


def quat_to_rotmat(q: mx.array) -> mx.array:
    """(N, 4) quaternions (w, x, y, z), normalised here, to (N, 3, 3) rotation matrices."""
    q = q / mx.sqrt(mx.sum(q * q, axis=-1, keepdims=True))
    w, x, y, z = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    return mx.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(-1, 3, 3)


def project(means, scales, quats, viewmats, k, width: int, height: int):
    """Per view and Gaussian: pixel means (V, N, 2), conics (V, N, 3), 2D variances (V, N, 2),
    depths (V, N), valid (V, N)."""
    fx, fy, cx, cy = k
    rot_w, t_w = viewmats[:, :3, :3], viewmats[:, :3, 3]
    p = mx.einsum("vij,nj->vni", rot_w, means) + t_w[:, None, :]
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    valid = z >= NEAR
    zs = mx.where(valid, z, mx.ones_like(z))
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    tx = zs * mx.clip(x / zs, -(cx / fx + 0.3 * tan_x), (width - cx) / fx + 0.3 * tan_x)
    ty = zs * mx.clip(y / zs, -(cy / fy + 0.3 * tan_y), (height - cy) / fy + 0.3 * tan_y)
    zero = mx.zeros_like(zs)
    jac = mx.stack([fx / zs, zero, -fx * tx / (zs * zs), zero, fy / zs, -fy * ty / (zs * zs)], -1)
    m = quat_to_rotmat(quats) * scales[:, None, :]
    tm = jac.reshape(*zs.shape, 2, 3) @ rot_w[:, None] @ m[None]
    cov = tm @ mx.swapaxes(tm, -1, -2)
    a, b, c = cov[..., 0, 0] + EPS2D, cov[..., 0, 1], cov[..., 1, 1] + EPS2D
    det = a * c - b * b
    conic = mx.stack([c / det, -b / det, a / det], -1)
    mean2d = mx.stack([fx * x / zs + cx, fy * y / zs + cy], -1)
    return mean2d, conic, mx.stack([a, c], -1), z, valid & (det > 0)


def _tile_table(mean2d, var2d, depth, valid, o, width: int, height: int):
    """numpy: (V·tiles, K) depth-ordered indices into the flattened (V·N) Gaussians per tile, V·N a pad."""
    v, n = depth.shape
    qmax = 2.0 * np.log(np.maximum(255.0 * o, 1.0))
    rad = np.sqrt(qmax[None, :, None] * var2d) * 1.001 + 1e-3
    keep = valid & (o >= ALPHA_MIN)[None]
    order = np.argsort(np.where(keep, depth, np.inf), axis=1, kind="stable")
    m = np.take_along_axis(mean2d, order[..., None], 1)
    rad = np.take_along_axis(rad, order[..., None], 1)
    keep = np.take_along_axis(keep, order, 1)
    lo, hi = m - rad, m + rad
    ty, tx = -(-height // TILE), -(-width // TILE)
    r0, r1 = np.arange(ty) * TILE + 0.5, np.minimum((np.arange(ty) + 1) * TILE, height) - 0.5
    c0, c1 = np.arange(tx) * TILE + 0.5, np.minimum((np.arange(tx) + 1) * TILE, width) - 0.5
    rows = (hi[:, None, :, 1] >= r0[None, :, None]) & (lo[:, None, :, 1] <= r1[None, :, None])
    cols = (hi[:, None, :, 0] >= c0[None, :, None]) & (lo[:, None, :, 0] <= c1[None, :, None])
    overlap = (rows[:, :, None] & cols[:, None] & keep[:, None, None]).reshape(v * ty * tx, n)
    count = max(int(overlap.sum(-1).max()), 1) if n else 1
    src = np.broadcast_to((order + np.arange(v)[:, None] * n)[:, None, None], (v, ty, tx, n)).reshape(-1, n)
    table = np.full((len(overlap), count + 1), v * n, np.int32)
    rows_i, cols_i = np.nonzero(overlap)
    table[rows_i, (np.cumsum(overlap, -1) - 1)[rows_i, cols_i]] = src[rows_i, cols_i]
    return table[:, :count], (ty, tx)


def _composite(px, py, mean2d, conic, opac, colors, background: float):
    """Front-to-back compositing: pixel centres (B, P) against depth-ordered Gaussians (B, K, ...)."""
    shape = px.shape
    color = mx.zeros((*shape, 3), dtype=colors.dtype)
    log_t = mx.zeros(shape, dtype=colors.dtype)
    done = mx.zeros(shape, dtype=mx.bool_)
    step = max(16, PAIRS // max(shape[0] * shape[1], 1))
    for g0 in range(0, mean2d.shape[1], step):
        g1 = min(mean2d.shape[1], g0 + step)
        dx = px[:, :, None] - mean2d[:, None, g0:g1, 0]
        dy = py[:, :, None] - mean2d[:, None, g0:g1, 1]
        a, b, c = (conic[:, None, g0:g1, i] for i in range(3))
        power = -0.5 * (a * dx * dx + c * dy * dy) - b * dx * dy
        alpha = mx.minimum(opac[:, None, g0:g1] * mx.exp(power), ALPHA_MAX)
        alpha = mx.where((alpha >= ALPHA_MIN) & (power <= 0), alpha, 0.0)
        lg = mx.log1p(-alpha)
        cum = log_t[..., None] + mx.cumsum(lg, axis=-1)
        added = (cum >= LOG_T_MIN) & ~done[..., None]
        weight = mx.where(added, alpha * mx.exp(cum - lg), 0.0)
        color = color + weight @ colors[:, g0:g1]
        done = done | mx.any((alpha > 0) & ~added, axis=-1)
        log_t = log_t + mx.sum(mx.where(added, lg, 0.0), axis=-1)
    return color + mx.exp(log_t)[..., None] * background


def rasterize(means, scales, quats, opacities, colors, viewmats, k, width: int, height: int, background=1.0):
    """(V, height, width, 3) renders from world-to-camera ``viewmats`` (V, 4, 4, OpenCV axes) with
    pinhole ``k`` = (fx, fy, cx, cy); differentiable in every Gaussian array."""
    v, n = viewmats.shape[0], means.shape[0]
    mean2d, conic, var2d, depth, valid = project(means, scales, quats, viewmats, k, width, height)
    table, (ty, tx) = _tile_table(*(np.array(mx.stop_gradient(a)) for a in (mean2d, var2d, depth, valid, opacities)),
                                  width, height)
    m2 = mx.concatenate([mean2d.reshape(v * n, 2), mx.zeros((1, 2), dtype=means.dtype)])
    cn = mx.concatenate([conic.reshape(v * n, 3), mx.array([[1.0, 0.0, 1.0]], dtype=means.dtype)])
    op = mx.concatenate([mx.broadcast_to(opacities[None], (v, n)).reshape(-1), mx.zeros((1,), dtype=means.dtype)])
    col = mx.concatenate([mx.broadcast_to(colors[None], (v, n, 3)).reshape(-1, 3), mx.zeros((1, 3), dtype=means.dtype)])
    grid = np.arange(TILE) + 0.5
    px = np.broadcast_to((np.arange(tx)[:, None] * TILE + grid)[None, None, :, None, :], (v, ty, tx, TILE, TILE))
    py = np.broadcast_to((np.arange(ty)[:, None] * TILE + grid)[None, :, None, :, None], (v, ty, tx, TILE, TILE))
    px, py = (a.reshape(v * ty * tx, -1) for a in (px, py))
    # Tiles in groups of similar Gaussian counts, each padded only to its own longest list.
    counts = (table < v * n).sum(1)
    order = np.argsort(counts, kind="stable")
    parts = []
    for tiles in np.array_split(order, min(GROUPS, len(order))):
        sub = mx.array(table[tiles, :max(int(counts[tiles].max()), 1)])
        parts.append(_composite(mx.array(px[tiles], dtype=means.dtype), mx.array(py[tiles], dtype=means.dtype),
                                m2[sub], cn[sub], op[sub], col[sub], background))
    out = mx.concatenate(parts)[mx.array(np.argsort(order))]
    out = out.reshape(v, ty, tx, TILE, TILE, 3).transpose(0, 1, 3, 2, 4, 5).reshape(v, ty * TILE, tx * TILE, 3)
    return out[:, :height, :width]


def render_gaussians(gaussians: dict, viewmats, k, size: int):
    """The Backend hook: numpy arrays or mx arrays in (the latter differentiable), an mx array out."""
    t = {n: v if isinstance(v, mx.array) else mx.array(np.asarray(v, np.float32)) for n, v in gaussians.items()}
    vm = mx.array(np.asarray(viewmats, np.float32))
    return rasterize(t["means"], t["scales"], t["quats"], t["opacities"], t["colors"], vm, k, size, size)


# --------------------------------------------------------------------------- fitting


def _ssim_window(size: int = 11, sigma: float = 1.5) -> mx.array:
    x = np.arange(size) - size // 2
    g = np.exp(-(x * x) / (2 * sigma * sigma))
    g /= g.sum()
    w = (g[:, None] * g[None, :]).astype(np.float32)
    return mx.array(np.broadcast_to(w[None, :, :, None], (3, size, size, 1)).copy())


def ssim(img1, img2, window):
    """3DGS's ``ssim`` on (B, H, W, 3): 11×11 Gaussian window σ 1.5, zero padding, mean over all."""
    pad = window.shape[1] // 2

    def blur(x):
        return mx.conv2d(x, window, padding=pad, groups=3)

    mu1, mu2 = blur(img1), blur(img2)
    s11, s22, s12 = blur(img1 * img1) - mu1 * mu1, blur(img2 * img2) - mu2 * mu2, blur(img1 * img2) - mu1 * mu2
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return mx.mean(((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 * mu1 + mu2 * mu2 + c1) * (s11 + s22 + c2)))


class GaussianTrainer:
    """Adam on 0.8·L1 + 0.2·(1 − SSIM) (3DGS's loss); raw parameters as in ``oxigaf_torch.splat``."""

    NAMES = ("means", "log_scales", "quats", "opacity_logits", "color_logits")

    def __init__(self, raw: dict, targets: np.ndarray, viewmats: np.ndarray, k, size: int, lrs: dict,
                 lambda_dssim: float = 0.2):
        self.k, self.size, self.lrs, self.lambda_dssim = tuple(k), int(size), dict(lrs), lambda_dssim
        self.window = _ssim_window()
        self.set_targets(targets, viewmats)
        self.set_params(raw)

    def set_targets(self, targets: np.ndarray, viewmats: np.ndarray) -> None:
        self.targets = mx.array(np.asarray(targets, np.float32))
        self.viewmats = mx.array(np.asarray(viewmats, np.float32))

    def set_params(self, raw: dict) -> None:
        self.params = {n: mx.array(np.asarray(raw[n], np.float32)) for n in self.NAMES}
        self.opts = {n: optim.Adam(learning_rate=self.lrs[n], eps=1e-15) for n in self.NAMES}

    def set_lr(self, name: str, lr: float) -> None:
        self.lrs[name] = lr
        self.opts[name].learning_rate = lr

    def _render(self, params, viewmats):
        return rasterize(params["means"], mx.exp(params["log_scales"]), params["quats"],
                         mx.sigmoid(params["opacity_logits"]), mx.sigmoid(params["color_logits"]), viewmats, self.k,
                         self.size, self.size)

    def step(self, frames) -> dict:
        idx = mx.array(np.asarray(frames, np.int32))
        vms, gt = self.viewmats[idx], self.targets[idx]

        def loss_fn(params):
            pred = self._render(params, vms)
            return ((1 - self.lambda_dssim) * mx.mean(mx.abs(pred - gt))
                    + self.lambda_dssim * (1 - ssim(pred, gt, self.window)))

        loss, grads = mx.value_and_grad(loss_fn)(self.params)
        grad_means = np.linalg.norm(np.array(grads["means"]), axis=-1)
        for n in self.NAMES:
            self.params[n] = self.opts[n].apply_gradients({"p": grads[n]}, {"p": self.params[n]})["p"]
        mx.eval(self.params, *[o.state for o in self.opts.values()])
        return {"loss": float(loss), "grad_means": grad_means}

    def raw(self) -> dict:
        return {n: np.array(p) for n, p in self.params.items()}

    def render(self, viewmats: np.ndarray) -> np.ndarray:
        return np.array(self._render(self.params, mx.array(np.asarray(viewmats, np.float32))))
