"""Privileged simulator state for scripted experts, and the pose controller they share.

``Scene`` reads what a scripted expert may use and a learned policy never sees: object and
fixture poses, sites, joint positions, contacts and the end-effector pose, straight from the
MuJoCo data of a LIBERO (robosuite) env.

``pose_action`` turns a target grip-site pose into one action of LIBERO's controller: the
robosuite OSC_POSE controller in delta mode at 20 Hz, whose input [-1, 1] maps to a goal
offset of at most 0.05 m (position) and 0.5 rad (orientation, an axis-angle in the world
frame, pre-multiplied onto the current orientation), and LIBERO's gripper convention
(-1 open, +1 close).
"""
from __future__ import annotations

import mujoco
import numpy as np
import robosuite.utils.transform_utils as T

POS_LIMIT, ROT_LIMIT = 0.05, 0.5  # OSC_POSE output_max: metres / radians per unit of action
OPEN, CLOSE = -1.0, 1.0  # LIBERO's gripper command


def down(yaw: float = 0.0) -> np.ndarray:
    """Orientation of the grip site (the frame LIBERO's controller moves) for a hand pointing
    straight down, turned by ``yaw`` about the world z axis. At yaw 0 (LIBERO's home pose) the
    site's x axis is the world's y axis and the Panda's fingers close along the world y axis."""
    c, s = np.cos(yaw), np.sin(yaw)
    rz = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return rz @ np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])


def horizontal(toward: np.ndarray) -> np.ndarray:
    """Orientation of the grip site for a hand pointing horizontally along ``toward`` (world),
    its fingers closing vertically (to pinch a horizontal bar such as a drawer handle). For
    ``toward`` -y it is ``down(0)`` pitched by 90 degrees about the world x axis (the smallest turn
    from and back to a top-down grasp: a larger one winds the wrist up to its joint limits)."""
    z = np.array([toward[0], toward[1], 0.0], float)
    z /= np.linalg.norm(z)
    x = np.array([0.0, 0.0, -1.0])
    return np.stack([x, np.cross(z, x), z], axis=1)


def pose_action(pos: np.ndarray, mat: np.ndarray, target_pos: np.ndarray, target_mat: np.ndarray,
                gripper: float, max_speed: float = 1.0, gain: float = 1.0, rot_gain: float = 1.0) -> np.ndarray:
    """One 7-D action towards the target pose: position error / 0.05 m times ``gain``, its norm
    capped at ``max_speed`` (in action units); orientation error (axis-angle, world frame)
    / 0.5 rad times ``rot_gain``, clipped to [-1, 1]; then the gripper command."""
    move = gain * (np.asarray(target_pos, float) - pos) / POS_LIMIT
    norm = np.linalg.norm(move)
    if norm > max_speed:
        move *= max_speed / norm
    err = T.quat2axisangle(T.mat2quat(target_mat @ mat.T))
    rot = np.clip(rot_gain * err / ROT_LIMIT, -1.0, 1.0)
    return np.concatenate([np.clip(move, -1.0, 1.0), rot, [gripper]])


class Scene:
    """Read-only views of a LIBERO env's simulator state (``env``: LIBERO's ``ControlEnv`` /
    ``OffScreenRenderEnv``, or the robosuite env inside it)."""

    def __init__(self, env):
        self.env = getattr(env, "env", env)  # the robosuite (BDDL) environment
        self.robot = self.env.robots[0]
        self.model = self.env.sim.model._model
        self.data = self.env.sim.data._data
        fingers = self.robot.gripper.important_geoms
        self._finger_geoms = {name: {self.env.sim.model.geom_name2id(g) for g in fingers[name]}
                              for name in ("left_finger", "right_finger")}

    # -- the robot -----------------------------------------------------------------------
    @property
    def eef_pos(self) -> np.ndarray:
        return np.array(self.env.sim.data.site_xpos[self.robot.eef_site_id])

    @property
    def eef_mat(self) -> np.ndarray:
        return np.array(self.env.sim.data.site_xmat[self.robot.eef_site_id]).reshape(3, 3)

    @property
    def finger_opening(self) -> float:
        """Distance between the two finger joints (m): ~0.08 open, ~0.002 closed on nothing."""
        q = self.env.sim.data.qpos[self.robot._ref_gripper_joint_pos_indexes]
        return float(q[0] - q[1])

    # -- objects, fixtures, sites, joints ------------------------------------------------------
    def pos(self, name: str) -> np.ndarray:
        """World position of an object / fixture (its body) or of a site."""
        env = self.env
        if name in env.obj_body_id:
            return np.array(env.sim.data.body_xpos[env.obj_body_id[name]])
        return np.array(env.sim.data.get_site_xpos(name))

    def mat(self, name: str) -> np.ndarray:
        env = self.env
        if name in env.obj_body_id:
            return np.array(env.sim.data.body_xmat[env.obj_body_id[name]]).reshape(3, 3)
        return np.array(env.sim.data.get_site_xmat(name))

    def body_pos(self, body: str) -> np.ndarray:
        return np.array(self.data.xpos[mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, body)])

    def geom_pos(self, geom: str) -> np.ndarray:
        return np.array(self.data.geom_xpos[mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_GEOM, geom)])

    def joint(self, name: str) -> float:
        return float(self.env.sim.data.get_joint_qpos(name))

    def grasped(self, name: str) -> bool:
        """Both fingers touch object ``name``."""
        geoms = {self.env.sim.model.geom_name2id(g) for g in self.env.get_object(name).contact_geoms
                 if g in self.env.sim.model._geom_name2id}
        touching = {"left_finger": False, "right_finger": False}
        for c in self.data.contact[: self.data.ncon]:
            for finger, ids in self._finger_geoms.items():
                if (c.geom1 in ids and c.geom2 in geoms) or (c.geom2 in ids and c.geom1 in geoms):
                    touching[finger] = True
        return all(touching.values())
