"""Generate views at poses of your choosing with the Python API.

    python examples/custom_cameras.py [IMAGE] [--model FOLDER_OR_HUB_ID] [-o OUT]

Without --model it runs on the tiny random-weight demo model (views are noise), so it works on any
machine; with --model ashawkey/imagedream-ipmv-diffusers it uses the real weights.
"""

import argparse

from oxigaf import CameraParams, DiffusionConfig, Pipeline
from oxigaf.demo import bundled_portrait, tiny_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("image", nargs="?", default=str(bundled_portrait()))
    parser.add_argument("--model", default=None)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("-o", "--output", default="views_custom")
    args = parser.parse_args()
    model = args.model or tiny_model()[0]

    # Azimuth 0 is the photo's own viewpoint; positive azimuths orbit to the right seen from the
    # front. Distance only matters for the exported poses.
    cameras = [
        CameraParams(azimuth=0, elevation=0, distance=2.0),    # front (the input view)
        CameraParams(azimuth=45, elevation=0, distance=2.0),   # three-quarter right
        CameraParams(azimuth=-45, elevation=0, distance=2.0),  # three-quarter left
        CameraParams(azimuth=0, elevation=30, distance=2.0),   # from above
        CameraParams.from_radians(3.14159, 0.0, 2.0),          # the back, given in radians
    ]
    pipe = Pipeline.from_pretrained(model, backend=args.backend,
                                    config=DiffusionConfig(num_inference_steps=50 if args.model else 4))
    out = pipe.generate(args.image, cameras=cameras, seed=0)
    out.save(args.output, overwrite=True)
    for cam, view in zip(out.cameras, out.views, strict=True):
        print(f"azimuth {cam.azimuth:7.1f}  elevation {cam.elevation:5.1f}  -> {view.size[0]}x{view.size[1]}")
    print("stages:", {k: round(v, 2) for k, v in out.timings.items()}, "->", args.output)


if __name__ == "__main__":
    main()
