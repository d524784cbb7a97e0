"""The constants of the original 3DGS rasteriser, which both backends' renderers follow."""

import math

NEAR = 0.01  # Gaussians nearer the camera than this (camera depth) are dropped
EPS2D = 0.3  # added to the 2D covariance's diagonal (EWA's low-pass filter)
ALPHA_MAX = 0.99  # a fragment's alpha is clamped to this
ALPHA_MIN = 1.0 / 255.0  # fragments below this alpha are skipped
LOG_T_MIN = math.log(1e-4)  # a Gaussian that would bring the transmittance below 1e-4 ends the pixel
TILE = 8  # pixels per side of a compositing tile
GROUPS = 4  # tiles are composited in this many groups of similar length
PAIRS = 1 << 21  # pixel × Gaussian pairs per compositing chunk
