"""Feed the saved views onward: read ``transforms.json`` the way a Gaussian-splatting fit does.

    python examples/load_transforms.py VIEWS_FOLDER

Prints each frame's camera centre, viewing direction and intrinsics, checks that every camera looks
at the subject (the origin), and shows the arrays (images, camera-to-world, K) that a splatting or
NeRF trainer starts from. The same folder can be handed to nerfstudio directly:
``ns-train splatfacto --data VIEWS_FOLDER``.
"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def load(folder: Path):
    meta = json.loads((folder / "transforms.json").read_text())
    images = np.stack([np.asarray(Image.open(folder / f["file_path"]).convert("RGB")) for f in meta["frames"]])
    c2w = np.array([f["transform_matrix"] for f in meta["frames"]], dtype=np.float64)  # OpenGL axes
    K = np.array([[meta["fl_x"], 0, meta["cx"]], [0, meta["fl_y"], meta["cy"]], [0, 0, 1]])
    return images, c2w, K


def main(folder: str):
    images, c2w, K = load(Path(folder))
    print(f"{len(images)} views of {images.shape[2]}x{images.shape[1]}; K =\n{K.round(2)}")
    for i, m in enumerate(c2w):
        centre, forward = m[:3, 3], -m[:3, 2]  # OpenGL cameras look down -z
        to_subject = -centre / np.linalg.norm(centre)
        print(f"view {i}: centre {centre.round(3)}, distance {np.linalg.norm(centre):.2f}, "
              f"looks at subject: {np.dot(forward, to_subject) > 0.999}")
    # OpenCV-convention poses (COLMAP, gsplat) flip the camera's y and z axes.
    c2w_cv = c2w @ np.diag([1.0, -1.0, -1.0, 1.0])
    print("OpenCV world-to-camera of view 0:\n", np.linalg.inv(c2w_cv[0]).round(3))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "views")
