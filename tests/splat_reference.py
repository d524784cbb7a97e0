"""A float64 brute-force 3DGS renderer for the splat tests: per pixel, per Gaussian, the rules literally."""

import math

import numpy as np


def quat_rot(q):
    w, x, y, z = np.asarray(q, np.float64) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def render_reference(g: dict, viewmats, k, size: int, background: float = 1.0) -> np.ndarray:
    fx, fy, cx, cy = (float(v) for v in k)
    out = np.zeros((len(viewmats), size, size, 3))
    for v, vm in enumerate(np.asarray(viewmats, np.float64)):
        w_rot, w_t = vm[:3, :3], vm[:3, 3]
        splats = []
        for i in range(len(g["means"])):
            x, y, z = w_rot @ np.asarray(g["means"][i], np.float64) + w_t
            if z < 0.01:
                continue  # behind the near plane
            lim_x, lim_y = 1.3 * 0.5 * size / fx, 1.3 * 0.5 * size / fy
            tx, ty = z * min(lim_x, max(-lim_x, x / z)), z * min(lim_y, max(-lim_y, y / z))
            jac = np.array([[fx / z, 0, -fx * tx / z ** 2], [0, fy / z, -fy * ty / z ** 2]])
            s = np.diag(np.asarray(g["scales"][i], np.float64))
            rs = quat_rot(g["quats"][i]) @ s
            cov2 = jac @ w_rot @ rs @ rs.T @ w_rot.T @ jac.T + 0.3 * np.eye(2)
            splats.append((z, np.array([fx * x / z + cx, fy * y / z + cy]), np.linalg.inv(cov2),
                           float(g["opacities"][i]), np.asarray(g["colors"][i], np.float64)))
        splats.sort(key=lambda s: s[0])
        for row in range(size):
            for col in range(size):
                pix = np.array([col + 0.5, row + 0.5])
                t, c = 1.0, np.zeros(3)
                for _, mean, conic, opac, color in splats:
                    d = pix - mean
                    power = -0.5 * d @ conic @ d
                    if power > 0:
                        continue
                    alpha = min(0.99, opac * math.exp(power))
                    if alpha < 1.0 / 255.0:
                        continue
                    if t * (1 - alpha) < 1e-4:
                        break
                    c += color * alpha * t
                    t *= 1 - alpha
                out[v, row, col] = c + t * background
    return out
