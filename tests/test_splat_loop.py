"""The GAF loop's mechanics (with a stand-in pipeline) and the toy heads' bare-shape templates."""

import numpy as np
import pytest

from oxigaf import toys
from oxigaf.errors import InputError
from oxigaf.splat.fit import Fitter, Frames, initial_gaussians
from oxigaf.splat.loop import T_RANGE, gaf_loop

pytest.importorskip("torch")


class StandIn:
    """What gaf_loop calls on a Pipeline, recorded; refine returns the renders brightened."""

    native_size = 16

    def __init__(self, maps=1):
        self.conditioning_maps = maps
        self.conditions, self.calls = 0, []

    def condition(self, photo):
        self.conditions += 1
        return "cond"

    def refine(self, views, image, cameras, strength, num_inference_steps, normals, seed, output_size, progress):
        self.calls.append({"views": len(views), "image": image, "cameras": cameras, "strength": strength,
                           "normals": None if normals is None else len(normals), "steps": num_inference_steps})

        class Out:
            images = np.clip(np.asarray(views) + 0.1, 0, 1)

        return Out()


@pytest.fixture
def fitter():
    frames = Frames.from_cameras(toys.render(toys.HELD_OUT_SEED, [0.0], 16)[0], [0.0])
    return Fitter(frames, initial_gaussians(frames, 60), iterations=10, backend="torch")


def test_loop_refines_four_renders_per_round_with_annealed_t(fitter):
    pipe, saved, maps = StandIn(), [], []
    gaf_loop(fitter, None, fitter.frames.images[0], rounds=4, pipeline=pipe, checkpoint=saved.append,
             template=lambda cams, size: maps.append(len(cams)) or np.full((len(cams), size, size, 3), 0.5))
    assert pipe.conditions == 1 and len(pipe.calls) == 4 and len(saved) == 5
    assert all(c["views"] == 4 and c["normals"] == 5 and c["image"] == "cond" and c["steps"] == 50
               for c in pipe.calls)
    assert maps == [5] * 4  # the 4 cameras and the photo's, last
    strengths = [c["strength"] for c in pipe.calls]
    assert all(T_RANGE[0] / 1000 <= s <= T_RANGE[1] / 1000 for s in strengths)
    assert strengths[-1] <= 0.021  # the last round's t_max is 20
    azimuths = [sorted(c.azimuth % 360 for c in call["cameras"]) for call in pipe.calls]
    assert all(np.allclose(np.diff(a), 90.0) for a in azimuths)
    assert fitter.iteration == 10 and len(fitter.frames) == 1 + 4


def test_loop_needs_a_template_for_a_normal_conditioned_model(fitter):
    with pytest.raises(InputError, match="template"):
        gaf_loop(fitter, None, fitter.frames.images[0], pipeline=StandIn(maps=1))
    pipe = StandIn(maps=0)
    gaf_loop(fitter, None, fitter.frames.images[0], rounds=1, pipeline=pipe)
    assert pipe.calls[0]["normals"] is None


def test_template_normals_are_the_bare_head():
    cams = [0.0, 180.0]
    _, full = toys.render(toys.HELD_OUT_SEED, cams, 32)
    bare = toys.template_normals(toys.HELD_OUT_SEED, cams, 32)
    on_full, on_bare = (full < 1).any(-1), (bare < 1).any(-1)
    assert on_bare.sum() > 0.5 * on_full.sum()
    assert not (on_bare & ~on_full).any()  # a subset of the head's parts covers a subset of its pixels
    assert np.abs(full[1] - bare[1]).mean() > 0.01  # from behind: hair on the head, none on the template
    subj = toys.subject(toys.HELD_OUT_SEED)
    assert {p.name for p in subj.parts} - set(toys.TEMPLATE_PARTS) >= {"hair", "eye_left", "mouth"}


def test_loop_can_keep_every_rounds_views(fitter):
    gaf_loop(fitter, None, fitter.frames.images[0], rounds=3, pipeline=StandIn(maps=0), accumulate=True)
    assert len(fitter.frames) == 1 + 3 * 4 and fitter.iteration == 10
