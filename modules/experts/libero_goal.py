"""Scripted experts for the ten LIBERO-Goal tasks (one kitchen scene, ten goals).

Each expert is a plan of closed-loop phases (modules/experts/plan.py) over privileged state:
object and fixture poses, drawer and knob joints, finger contacts. Grasps are top-down with
the fingers closing along the world y axis (yaw 0) unless a plan turns the hand. Placing is
closed-loop on the *object*: the hand moves by (goal - object position), so where the object
sits in the hand does not matter.
"""
from __future__ import annotations

import numpy as np

from modules.experts.plan import Phase, PhaseExpert
from modules.experts.scene import CLOSE, OPEN, Scene

BOWL, PLATE, CHEESE, BOTTLE = "akita_black_bowl_1", "plate_1", "cream_cheese_1", "wine_bottle_1"
CABINET, STOVE, RACK = "wooden_cabinet_1", "flat_stove_1", "wine_rack_1"
BOWL_RIM = 0.047        # bowl wall radius at the rim (m), from the bowl's collision geoms
BOWL_GRASP_DZ = 0.035   # grip site above the bowl's origin when grasping the rim


def _xyz(x, y, z) -> np.ndarray:
    return np.array([x, y, z], float)


def _above(p: np.ndarray, dz: float) -> np.ndarray:
    return p + _xyz(0, 0, dz)


def _object_to(obj: str, goal) -> callable:
    """Target for the hand that brings ``obj`` to ``goal(scene)`` (hand moves by goal - obj)."""
    return lambda s: s.eef_pos + (goal(s) - s.pos(obj))


def _grasp_phases(obj: str, grasp, approach: float = 0.10, yaw: float = 0.0) -> list[Phase]:
    """Open above the grasp point, descend, close and wait for the fingers to settle."""
    return [
        Phase("above " + obj, lambda s: _above(grasp(s), approach), OPEN, yaw, tol=0.02),
        Phase("descend to " + obj, grasp, OPEN, yaw, tol=0.008, speed=0.6),
        Phase("close on " + obj, grasp, CLOSE, yaw, min_steps=10, max_steps=14,
              until=lambda s: s.grasped(obj)),
    ]


def _carry_phases(obj: str, goal, lift_z, hold_dz: float, yaw: float = 0.0,
                  release_clearance: float = 0.02) -> list[Phase]:
    """Lift the hand to ``lift_z(scene) + hold_dz`` (the object, held ``hold_dz`` below the
    grip site, at ``lift_z``), move ``obj`` over ``goal``, lower it to ``goal`` +
    ``release_clearance``, open and back off upwards."""
    def over_goal(s):
        g = goal(s)
        return _xyz(g[0], g[1], lift_z(s))

    def at_goal(s):
        return _above(goal(s), release_clearance)

    return [
        Phase("lift " + obj, lambda s: _xyz(*s.eef_pos[:2], lift_z(s) + hold_dz), CLOSE, yaw, tol=0.02, speed=0.8),
        Phase("carry " + obj, _object_to(obj, over_goal), CLOSE, yaw, tol=0.015, max_steps=120),
        Phase("lower " + obj, _object_to(obj, at_goal), CLOSE, yaw, tol=0.008, speed=0.5),
        Phase("release " + obj, lambda s: s.eef_pos, OPEN, yaw, min_steps=6, max_steps=6),
        Phase("back off", lambda s: _above(s.eef_pos, 0.08), OPEN, yaw, tol=0.02, max_steps=20),
    ]


def _bowl_grasp(scene: Scene):
    """The bowl's rim on its +y side, the fingers straddling the wall. (On the -y side the
    hand, 0.2 m long along the finger axis, hits the cabinet's drawer handles when the bowl
    goes down onto the plate.)"""
    offset = _xyz(0, BOWL_RIM, BOWL_GRASP_DZ)
    return lambda s: s.pos(BOWL) + offset


def bowl_to(goal, lift_z=lambda s: 1.05):
    def plan(scene: Scene) -> list[Phase]:
        return _grasp_phases(BOWL, _bowl_grasp(scene)) + _carry_phases(BOWL, goal, lift_z, BOWL_GRASP_DZ)
    return plan


PLANS = {
    # 8: put the bowl on the plate (On: within 3 cm of the plate's centre, touching it)
    8: bowl_to(lambda s: s.pos(PLATE) + _xyz(0, 0, 0.01)),
    # 1: put the bowl on the stove (On the cook region site: inside its 0.15 m square, touching the stove)
    1: bowl_to(lambda s: s.pos(STOVE + "_cook_region") + _xyz(0, 0, 0.02)),
    # 4: put the bowl on top of the cabinet
    4: bowl_to(lambda s: s.pos(CABINET + "_top_side") + _xyz(0, 0, 0.005), lift_z=lambda s: 1.22),
}


def libero_goal_expert(task_id: int) -> PhaseExpert:
    if task_id not in PLANS:
        raise ValueError(f"task_id={task_id!r}: no scripted LIBERO-Goal expert (have: {sorted(PLANS)})")
    return PhaseExpert(PLANS[task_id])
