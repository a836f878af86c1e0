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
from modules.experts.scene import CLOSE, OPEN, Scene, down, horizontal

BOWL, PLATE, CHEESE, BOTTLE = "akita_black_bowl_1", "plate_1", "cream_cheese_1", "wine_bottle_1"
CABINET, STOVE, RACK = "wooden_cabinet_1", "flat_stove_1", "wine_rack_1"
BOWL_RIM = 0.047        # bowl wall radius at the rim (m), from the bowl's collision geoms
BOWL_GRASP_DZ = 0.035   # grip site above the bowl's origin when grasping the rim
BOWL_GRASP_DZ_HIGH = 0.045  # the same near the rim's top (the wall spans 0.015-0.053 above the origin)


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


def _bowl_grasp(scene: Scene, dz: float = None):
    """The bowl's rim on its +y side, the fingers straddling the wall, the grip site ``dz``
    above the bowl's origin. (On the -y side the hand, 0.2 m long along the finger axis, hits
    the cabinet's drawer handles when the bowl goes down onto the plate.)"""
    offset = _xyz(0, BOWL_RIM, BOWL_GRASP_DZ if dz is None else dz)
    return lambda s: s.pos(BOWL) + offset


def bowl_to(goal, lift_z=lambda s: 1.05):
    def plan(scene: Scene) -> list[Phase]:
        return _grasp_phases(BOWL, _bowl_grasp(scene)) + _carry_phases(BOWL, goal, lift_z, BOWL_GRASP_DZ)
    return plan


CHEESE_GRASP_DZ = 0.01  # grip site above the cream cheese's centre (the box is 1.8 cm tall, long along x)


def cheese_in_bowl(scene: Scene) -> list[Phase]:
    grasp = lambda s: s.pos(CHEESE) + _xyz(0, 0, CHEESE_GRASP_DZ)  # noqa: E731 (fingers across its 4.2 cm side)
    return _grasp_phases(CHEESE, grasp) + _carry_phases(
        CHEESE, lambda s: s.pos(BOWL) + _xyz(0, 0, 0.03), lambda s: 1.0, CHEESE_GRASP_DZ)


DRAG_Z = 0.915          # grip site height when dragging the plate: fingertips inside its dish, under the rim
DRAG_LEAD = 0.06        # the hand's target ahead of the plate's centre (its inner rim: ~0.045)


def _drag_phases(obj: str, goal, direction: np.ndarray, tol: float = 0.01) -> list[Phase]:
    """Drag a dish (the plate) along the world ``direction`` until it is within ``tol`` of
    ``goal(scene)`` along it: the open fingertips go down into the dish at its centre, then the
    hand leads the dish by up to 3 cm, so the fingers press on the inside of its far rim
    (closed-loop on the dish's position). The finger axis lies across ``direction``. (Pushing
    the plate from outside puts the forearm against the cabinet's top drawer handle.)"""
    u = _xyz(direction[0], direction[1], 0)
    u /= np.linalg.norm(u)
    yaw = float((np.arctan2(u[1], u[0]) + np.pi / 2) % np.pi - np.pi / 2)

    def along(s):  # how far the dish still has to go
        return float(np.dot(goal(s)[:2] - s.pos(obj)[:2], u[:2]))

    def at(s, lead):  # ``lead`` ahead of the dish's centre, steering it back onto the line to the goal
        off_line = goal(s) - s.pos(obj)
        off_line = off_line - np.dot(off_line[:2], u[:2]) * u
        p = s.pos(obj) + u * lead + 0.5 * off_line
        return _xyz(p[0], p[1], DRAG_Z)

    return [
        Phase(f"above {obj}", lambda s: _above(at(s, 0.0), 0.08), OPEN, yaw, tol=0.02),
        Phase(f"into {obj}", lambda s: at(s, 0.0), OPEN, yaw, tol=0.008, speed=0.6),
        Phase(f"drag {obj}", lambda s: at(s, DRAG_LEAD), OPEN, yaw, speed=0.35, max_steps=120,
              until=lambda s: along(s) < tol),
    ]


def plate_to_stove_front(scene: Scene) -> list[Phase]:
    """Two straight drags, +y (and 2 cm -x) then -x into the region's near half, so the plate
    goes round the cream cheese (its edge clears the cheese on a line 2.5 cm beyond the region's
    centre; the region is 8 cm wide). Drags longer in -x lose the plate more often: the
    fingers ride up the inside of its rim."""
    front = scene.pos("main_table_stove_front_region")
    corner = _xyz(scene.pos(PLATE)[0] - 0.02, front[1] + 0.025, 0)
    end = _xyz(front[0] + 0.02, front[1] + 0.025, 0)  # the region's near half: a shorter second drag
    return (_drag_phases(PLATE, lambda s: corner, corner - scene.pos(PLATE))
            + [Phase("up", lambda s: _xyz(*s.eef_pos[:2], DRAG_Z + 0.03), OPEN, np.pi / 2, tol=0.01, max_steps=10)]
            + _drag_phases(PLATE, lambda s: end, end - corner)
            + [Phase("up", lambda s: _above(s.eef_pos, 0.06), OPEN, 0.0, tol=0.02, max_steps=15)])


HANDLES = {"top": "wooden_cabinet_1_g18", "middle": "wooden_cabinet_1_g29", "bottom": "wooden_cabinet_1_g40"}
DRAWER_FLOORS = {"top": "wooden_cabinet_1_g16", "middle": "wooden_cabinet_1_g27", "bottom": "wooden_cabinet_1_g38"}
FACING_CABINET = horizontal(np.array([0.0, -1.0, 0.0]))  # the drawers open towards +y


def _open_drawer_phases(drawer: str, until_qpos: float = -0.15, speed: float = 0.5) -> list[Phase]:
    """Pinch the drawer's handle bar (hand horizontal, pointing -y, fingers closing vertically),
    pull it out until its joint reads ``until_qpos`` (LIBERO's Open: qpos < -0.14; the hand
    chases the handle, which moves with the drawer), let go and back off. ``speed``: of the
    reach and the pull."""
    handle, joint = HANDLES[drawer], f"{CABINET}_{drawer}_level"
    bar = lambda s: s.geom_pos(handle)  # noqa: E731
    rot = dict(orientation=FACING_CABINET)
    return [
        Phase(f"before the {drawer} handle", lambda s: bar(s) + _xyz(0, 0.12, 0.05), OPEN, tol=0.02, **rot),
        Phase(f"level with the {drawer} handle", lambda s: bar(s) + _xyz(0, 0.08, 0), OPEN, tol=0.01, **rot),
        Phase(f"reach the {drawer} handle", bar, OPEN, tol=0.006, speed=speed, **rot),
        Phase(f"pinch the {drawer} handle", bar, CLOSE, min_steps=10, max_steps=14, until=lambda s: s.grasped(CABINET),
              **rot),
        Phase(f"pull the {drawer} drawer", lambda s: bar(s) + _xyz(0, 0.05, 0), CLOSE, speed=speed, max_steps=60,
              until=lambda s: s.joint(joint) < until_qpos, **rot),
        Phase(f"let go of the {drawer} handle", lambda s: s.eef_pos, OPEN, min_steps=6, max_steps=6, **rot),
        Phase("back off", lambda s: bar(s) + _xyz(0, 0.08, 0.02), OPEN, tol=0.02, max_steps=20, **rot),
    ]


def open_top_drawer_and_put_bowl_inside(scene: Scene) -> list[Phase]:
    """The drawer opened 11 cm (a fully open one is in the way of the arm reaching for the
    bowl), the bowl put on the drawer's floor where it sticks out of the cabinet. The whole
    plan has to fit LIBERO-Goal's 300 steps, so it moves faster than the others."""
    floor = lambda s: s.geom_pos(DRAWER_FLOORS["top"]) + _xyz(0, 0.03, 0.01)  # noqa: E731
    # between the two, the hand goes back towards its start pose, so that the arm folds back (a
    # forearm still reaching towards the cabinet meets the open drawer on the way to the bowl)
    home = Phase("back towards the start pose", lambda s: _xyz(-0.15, 0.05, 1.15), OPEN, tol=0.04)
    # the rim held near its top, so that the hand stays above the drawer's walls
    grasp = _grasp_phases(BOWL, _bowl_grasp(scene, BOWL_GRASP_DZ_HIGH))
    grasp[1].speed = 0.8
    # the grasped bowl first drawn 6 cm away from the cabinet: straight up, the hand can meet
    # the open drawer's corner
    away = scene.pos(BOWL) + _xyz(0, 0.06, 0.03)
    draw = Phase("draw the bowl away", _object_to(BOWL, lambda s: away), CLOSE, tol=0.015, max_steps=25)
    return (_open_drawer_phases("top", until_qpos=-0.11, speed=0.8) + [home] + grasp + [draw]
            + _carry_phases(BOWL, floor, lambda s: 1.16, BOWL_GRASP_DZ_HIGH))


BOTTLE_GRASP_DZ = 0.135  # grip site above the wine bottle's origin (its base): on the neck, below the top


def bottle_to(goal, lift_z, release_clearance: float = 0.01):
    def plan(scene: Scene) -> list[Phase]:
        grasp = lambda s: s.pos(BOTTLE) + _xyz(0, 0, BOTTLE_GRASP_DZ)  # noqa: E731
        return _grasp_phases(BOTTLE, grasp) + _carry_phases(BOTTLE, goal, lift_z, BOTTLE_GRASP_DZ,
                                                            release_clearance=release_clearance)
    return plan


# the hand pitched to point horizontally along +x (fingers still closing along y): a bottle
# held by the neck then lies along x, its base towards +x
POINTING_PLUS_X = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]) @ down(0.0)
RACK_SLOT = _xyz(0.067, -0.015, 0.04)  # where the lying bottle's base goes, from the rack's top-region site


def bottle_on_rack(scene: Scene) -> list[Phase]:
    """The rack's top is a board sloping up towards -y with a rail at its lower edge; the goal
    region is a thin slab just above the board's lower part (2.2 cm either side of a plane
    ~1.2 cm above the board). The bottle, grasped by the neck, is lifted, turned to lie along x
    (the hand pitched 90 degrees), lowered onto the board and let go: it settles against the
    rail, with its base ~2 cm off that plane, at the edge of the region (so this expert
    succeeds only about as often as the settled pose happens to fall inside)."""
    grasp = lambda s: s.pos(BOTTLE) + _xyz(0, 0, BOTTLE_GRASP_DZ)  # noqa: E731
    slot = lambda s: s.pos(RACK + "_top_region") + RACK_SLOT  # noqa: E731
    lying = dict(orientation=POINTING_PLUS_X)
    return _grasp_phases(BOTTLE, grasp) + [
        Phase("lift the bottle", lambda s: _xyz(*s.eef_pos[:2], 1.35), CLOSE, tol=0.02, speed=0.8),
        Phase("turn the bottle over the rack", _object_to(BOTTLE, lambda s: slot(s) + _xyz(0, 0, 0.12)), CLOSE,
              tol=0.02, max_steps=60, speed=0.8, **lying),
        Phase("lower the bottle", _object_to(BOTTLE, slot), CLOSE, tol=0.01, max_steps=40, speed=0.5, **lying),
        Phase("release the bottle", lambda s: s.eef_pos, OPEN, min_steps=8, max_steps=8, **lying),
        Phase("back off", lambda s: s.eef_pos + _xyz(-0.05, 0, 0.03), OPEN, tol=0.01, max_steps=20, **lying),
    ]


KNOB, KNOB_JOINT = STOVE + "_button", STOVE + "_button"  # the knob's body and hinge (about z)
KNOB_GRASP_Z = 0.936    # grip site height on the knob's fin (the fin spans z 0.907-0.955)


def turn_on_stove(scene: Scene) -> list[Phase]:
    """Pinch the knob's fin (it runs along x through the hinge; the open fingers straddle its
    2.4 cm width) right above the hinge, then turn the wrist counter-clockwise until the knob
    reads on (LIBERO: hinge >= 0.5 rad)."""
    at = lambda s: _xyz(*s.body_pos(KNOB)[:2], KNOB_GRASP_Z)  # noqa: E731
    return [
        Phase("above the knob", lambda s: _above(at(s), 0.1), OPEN, tol=0.02),
        Phase("down to the knob", at, OPEN, tol=0.006, speed=0.6),
        Phase("pinch the knob", at, CLOSE, min_steps=10, max_steps=14, until=lambda s: s.grasped(STOVE)),
        Phase("turn the knob", at, CLOSE, yaw=1.0, max_steps=40, until=lambda s: s.joint(KNOB_JOINT) > 0.6),
        Phase("let go of the knob", lambda s: s.eef_pos, OPEN, yaw=1.0, min_steps=6, max_steps=6),
        Phase("up", lambda s: _above(s.eef_pos, 0.08), OPEN, yaw=1.0, tol=0.02, max_steps=20),
    ]


PLANS = {
    # 8: put the bowl on the plate (On: within 3 cm of the plate's centre, touching it)
    8: bowl_to(lambda s: s.pos(PLATE) + _xyz(0, 0, 0.01)),
    # 1: put the bowl on the stove (On the cook region site: inside its 0.15 m square, touching the stove)
    1: bowl_to(lambda s: s.pos(STOVE + "_cook_region") + _xyz(0, 0, 0.02)),
    # 4: put the bowl on top of the cabinet
    4: bowl_to(lambda s: s.pos(CABINET + "_top_side") + _xyz(0, 0, 0.005), lift_z=lambda s: 1.22),
    # 6: put the cream cheese in the bowl (On the bowl: within 3 cm of its centre, touching it)
    6: cheese_in_bowl,
    # 5: push the plate to the front of the stove (On the table region: its 8 cm square)
    5: plate_to_stove_front,
    # 0: open the middle drawer of the cabinet (Open: its joint below -0.14)
    0: lambda scene: _open_drawer_phases("middle"),
    # 3: open the top drawer and put the bowl inside (In the drawer's region: inside its box, touching)
    3: open_top_drawer_and_put_bowl_inside,
    # 7: turn on the stove (Turnon: the knob's hinge >= 0.5 rad)
    7: turn_on_stove,
    # 2: put the wine bottle on top of the cabinet (On the top side: over it, touching the cabinet)
    2: bottle_to(lambda s: s.pos(CABINET + "_top_side"), lambda s: 1.17),
    # 9: put the wine bottle on the rack (On its top region: lying on the top board, touching the rack)
    9: bottle_on_rack,
}


def libero_goal_expert(task_id: int) -> PhaseExpert:
    if task_id not in PLANS:
        raise ValueError(f"task_id={task_id!r}: no scripted LIBERO-Goal expert (have: {sorted(PLANS)})")
    return PhaseExpert(PLANS[task_id])
