"""BabyAI (minigrid) tasks as a batched TorchRL env speaking the VLA TensorDict schema.

The default level, ``GoToObjectRoom``, is the kit's CPU benchmark:
a 6x6 room holding the same three objects every episode (red ball, green key, blue box) at
random cells, the agent at a random pose. Task i = "go to the <object i>". Success follows
BabyAI GoTo: the target is in the cell in front of the agent after an action (reward
1 - 0.9 t / max_steps); facing a *wrong* object ends the episode with reward 0, so a policy
that ignores the instruction succeeds only ~1/3 of the time. Only the three navigation
actions (left, right, forward). Every episode samples the same scene distribution; only the
instruction changes between tasks (like LIBERO-Goal). ``objects`` (a stream entry's list of
"<colour> <ball|key|box>" names) puts another fixed set in the room, e.g. five objects for a
5-task stream (``configs/streams/babyai5.yaml``); the default is the three above.

Registered BabyAI levels (``BabyAI-GoToObj-v0``, ...) can also be used: success is a
positive reward at termination, the action space is minigrid's 7 actions.

Observations are the agent's 7x7 egocentric view rendered as RGB (``tile_size`` pixels per
cell, default 8 -> 56x56), rendered from the symbolic view through minigrid's own tile
renderer (cached per cell kind, so a frame is one array gather).

Fixed initial states (``num_init_states: N``, LIBERO-like): layout i is the scene minigrid
generates from seed i (objects, agent pose); every reset then picks one of the N layouts
(datamodules/init_states.py: the curriculum's queue, the pinned id of an evaluation env, or
a uniform draw) and the episode's id is the observation ``init_state_id``. Without it
(default) every reset draws a new layout from the env's seed stream.
"""
from __future__ import annotations

import numpy as np
import torch
from minigrid.core.constants import COLOR_TO_IDX, IDX_TO_COLOR, IDX_TO_OBJECT, OBJECT_TO_IDX
from minigrid.core.grid import Grid
from minigrid.core.mission import MissionSpace
from minigrid.core.world_object import Ball, Box, Key, Wall, WorldObj
from minigrid.minigrid_env import MiniGridEnv
from tensordict import NonTensorData, NonTensorStack, TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, NonTensor, Unbounded
from torchrl.envs import EnvBase

from datamodules.init_states import KEY as INIT_STATE_KEY
from datamodules.init_states import InitStateChooser, InitStateQueues

GOTO_OBJECTS = ("red ball", "green key", "blue box")
_OBJ_CLASSES = {"ball": Ball, "key": Key, "box": Box}
NAVIGATION_ACTIONS = 3  # left, right, forward
MIN_ROOM_SIZE = 3
DEFAULT_ROOM_SIZE = 6  # interior side of the GoToObjectRoom


class GoToObjectRoom(MiniGridEnv):
    """One room, a fixed set of objects at random cells; the mission names one of them."""

    def __init__(self, target: str, room_size: int = DEFAULT_ROOM_SIZE, max_steps: int = 64,
                 objects: tuple[str, ...] = GOTO_OBJECTS, **kwargs):
        check_objects(objects, target, room_size)
        self.target, self.objects = target, tuple(objects)
        self._encoded_grid = self._padded_room = None  # gen_obs's cache of the room's encoding
        mission = f"go to the {target}"
        super().__init__(
            mission_space=MissionSpace(mission_func=lambda: mission),
            grid_size=room_size + 2,
            max_steps=max_steps,
            see_through_walls=True,
            **kwargs,
        )

    def _gen_grid(self, width, height):
        self.grid = Grid(width, height)
        self.grid.wall_rect(0, 0, width, height)
        for name in self.objects:
            color, kind = name.split()
            self.place_obj(_OBJ_CLASSES[kind](color))
        self.place_agent()
        self.mission = f"go to the {self.target}"

    def gen_obs(self):
        """minigrid's observation (``MiniGridEnv.gen_obs``: the 7x7 view sliced from the room,
        rotated ``agent_dir + 1`` times by ``Grid.rotate_left``, encoded, the agent's cell empty),
        read from an encoding of the whole room padded with walls, made once per layout: only
        the agent moves here, so a step is one numpy slice and rotation instead of minigrid's
        per-cell Python loops (the same arrays: tests/test_babyai_env.py; the cost:
        bench/babyai_view.py, docs/benchmarks.md)."""
        n = self.agent_view_size
        if self._encoded_grid is not self.grid:  # a new layout (reset) or a changed room
            wall = np.array(Wall().encode(), np.uint8)
            padded = np.broadcast_to(wall, (self.width + 2 * n, self.height + 2 * n, 3)).copy()
            padded[n:n + self.width, n:n + self.height] = self.grid.encode()
            self._padded_room, self._encoded_grid = padded, self.grid
        top_x, top_y, _, _ = self.get_view_exts(n)
        view = self._padded_room[top_x + n:top_x + 2 * n, top_y + n:top_y + 2 * n]
        image = np.rot90(view, k=-(self.agent_dir + 1)).copy()  # Grid.rotate_left: new[j, w-1-i] = old[i, j]
        image[n // 2, n - 1] = self.carrying.encode() if self.carrying else (OBJECT_TO_IDX["empty"], 0, 0)
        return {"image": image, "direction": self.agent_dir, "mission": self.mission}

    def step(self, action):
        if action > self.actions.forward:  # pick up, drop, toggle may change the room
            self._encoded_grid = None
        obs, _, _, truncated, info = super().step(action)
        front = self.grid.get(*self.front_pos)
        reward, terminated, success = 0.0, False, False
        if front is not None and front.type in _OBJ_CLASSES:
            terminated = True  # facing any object ends the episode
            success = f"{front.color} {front.type}" == self.target
            reward = self._reward() if success else 0.0
        info["success"] = success
        return obs, reward, terminated, truncated and not terminated, info


class _TileRenderer:
    """Symbolic 7x7x3 views -> RGB frames with minigrid's own tiles, one gather per batch."""

    def __init__(self, tile_size: int, view_size: int = 7):
        self.tile_size, self.view_size = tile_size, view_size
        n_t, n_c = len(IDX_TO_OBJECT), len(IDX_TO_COLOR)
        tiles = np.zeros((n_t, n_c, 3, tile_size, tile_size, 3), np.uint8)
        for t in range(n_t):
            for c in range(n_c):
                for s in range(3):
                    obj = WorldObj.decode(t, c, s) if IDX_TO_OBJECT[t] not in ("unseen",) else None
                    if IDX_TO_OBJECT[t] == "unseen":
                        continue  # unseen cells stay black
                    tiles[t, c, s] = Grid.render_tile(obj, tile_size=tile_size)
        self.tiles = tiles
        # the agent always sits at the bottom centre of its own view, facing up
        self.agent_tile = Grid.render_tile(None, agent_dir=3, tile_size=tile_size)

    def __call__(self, views: np.ndarray) -> np.ndarray:
        """views: [B, 7, 7, 3] (x, y, channel) -> [B, 3, H, W] uint8."""
        t, c, s = views[..., 0], views[..., 1], views[..., 2]
        img = self.tiles[t, c, s]  # [B, x, y, ts, ts, 3]
        img[:, self.view_size // 2, self.view_size - 1] = self.agent_tile
        b, v, ts = img.shape[0], self.view_size, self.tile_size
        # rows of the frame are y, columns are x
        img = img.transpose(0, 5, 2, 3, 1, 4).reshape(b, 3, v * ts, v * ts)
        return np.ascontiguousarray(img)


def check_objects(objects, target, room_size, where: str = "") -> None:
    """A GoToObjectRoom scene: distinct "<colour> <ball|key|box>" names, the target among them,
    and a room with a free cell for each object and the agent. One line naming the bad key."""
    from minigrid.core.constants import COLOR_NAMES

    names = list(objects) if isinstance(objects, (list, tuple)) else None
    if not names or len(set(names)) != len(names) or any(
            not isinstance(n, str) or len(n.split()) != 2 or n.split()[0] not in COLOR_NAMES
            or n.split()[1] not in _OBJ_CLASSES for n in names):
        raise ValueError(f"{where}objects={objects!r}: expected distinct '<colour> <ball|key|box>' names "
                         f"(colours: {', '.join(COLOR_NAMES)})")
    if target not in names:
        raise ValueError(f"{where}target={target!r}: expected one of {names}")
    if not isinstance(room_size, int) or room_size < MIN_ROOM_SIZE or room_size ** 2 < len(names) + 1:
        raise ValueError(f"{where}room_size={room_size!r}: must be an integer >= {MIN_ROOM_SIZE} with a cell "
                         f"for each of the {len(names)} objects and the agent")


def make_minigrid(level: str, target: str | None, max_steps: int | None,
                  room_size: int = DEFAULT_ROOM_SIZE,
                  objects: tuple[str, ...] = GOTO_OBJECTS):
    """One gymnasium minigrid env for a task; unknown levels fail with one clear line."""
    if level == "GoToObjectRoom":
        return GoToObjectRoom(target=target, room_size=room_size, max_steps=max_steps or 64, objects=objects)
    import gymnasium as gym
    import minigrid  # noqa: F401  (registers the BabyAI levels)

    if level not in gym.registry:
        raise ValueError(f"level={level!r}: not GoToObjectRoom nor a registered minigrid/BabyAI id")
    kwargs = {"max_steps": max_steps} if max_steps else {}
    return gym.make(level, **kwargs).unwrapped


class BabyAIEnv(EnvBase):
    """``num_envs`` minigrid envs stepped in-process as one batched TorchRL env.

    Emits ``("observation", "image")`` uint8 [N, 3, H, W], ``language_instruction``
    (strings), ``reward``, ``done``/``terminated``/``truncated`` and ``success``.
    Takes ``action`` as a long index into the level's action set. ``target`` may be a list:
    env i then pursues ``target[i % len(target)]`` (several tasks in one batch).
    ``num_init_states``: N fixed layouts (see the module docstring), then also emits
    ``init_state_id`` [N, 1]; ``init_state_ids``: env i pinned to that layout (evaluation);
    ``init_state_queues``: the curriculum's ids for the next resets (datamodules/init_states.py).
    """

    def __init__(self, level: str = "GoToObjectRoom", target: str | list[str] | None = None,
                 num_envs: int = 8, seed: int = 0, tile_size: int = 8,
                 max_steps: int | None = None, room_size: int = DEFAULT_ROOM_SIZE, device: str = "cpu",
                 num_init_states: int | None = None, init_state_ids: list[int] | None = None,
                 init_state_queues: InitStateQueues | None = None, objects: tuple[str, ...] = GOTO_OBJECTS):
        super().__init__(batch_size=torch.Size([num_envs]), device=device)
        self.num_init_states = num_init_states
        self._layout_rng = torch.Generator().manual_seed(seed)
        self.choosers = None if num_init_states is None else [
            InitStateChooser(num_init_states, None if init_state_ids is None else init_state_ids[i],
                             self._layout_rng, init_state_queues, i) for i in range(num_envs)]
        if init_state_queues is not None and self.choosers is None:
            raise ValueError("BabyAIEnv: init-state queues need num_init_states (fixed layouts)")
        self._init_ids = np.full(num_envs, -1, np.int64)
        # a list of targets: env i pursues target i mod len (joint multi-task training)
        targets = target if isinstance(target, (list, tuple)) else [target]
        self.envs = [make_minigrid(level, targets[i % len(targets)], max_steps, room_size, tuple(objects))
                     for i in range(num_envs)]
        self.num_actions = NAVIGATION_ACTIONS if level == "GoToObjectRoom" else 7
        self.render_frames = _TileRenderer(tile_size)
        self._base_seed = seed
        self._seeded = False
        side = 7 * tile_size
        n = torch.Size([num_envs])
        self.observation_spec = Composite(
            observation=Composite(
                image=Bounded(0, 255, (num_envs, 3, side, side), dtype=torch.uint8),
                shape=n,
            ),
            language_instruction=NonTensor(shape=n, example_data="go to the red ball"),
            shape=n,
        )
        self.action_spec = Categorical(self.num_actions, shape=n, dtype=torch.long)
        self.reward_spec = Unbounded((num_envs, 1))
        self.full_done_spec = Composite(
            done=Categorical(2, (num_envs, 1), dtype=torch.bool),
            terminated=Categorical(2, (num_envs, 1), dtype=torch.bool),
            truncated=Categorical(2, (num_envs, 1), dtype=torch.bool),
            success=Categorical(2, (num_envs, 1), dtype=torch.bool),
            shape=n,
        )
        if self.choosers is not None:
            self.observation_spec[INIT_STATE_KEY] = Unbounded((num_envs, 1), dtype=torch.int64)
        self._views = np.zeros((num_envs, 7, 7, 3), np.int64)
        self._missions = [""] * num_envs

    def _set_seed(self, seed: int | None):
        self._base_seed = 0 if seed is None else int(seed)
        self._seeded = False
        self._layout_rng.manual_seed(self._base_seed)

    def _obs(self) -> TensorDict:
        frames = torch.from_numpy(self.render_frames(self._views))
        if len(set(self._missions)) == 1:  # one instruction for the batch: no per-env stack
            instruction = NonTensorData(self._missions[0], batch_size=self.batch_size,
                                        device=self.device)
        else:
            instruction = NonTensorStack(
                *(NonTensorData(m, device=self.device) for m in self._missions))
        out = TensorDict(
            {"observation": TensorDict({"image": frames}, batch_size=self.batch_size),
             "language_instruction": instruction},
            batch_size=self.batch_size, device=self.device,
        )
        if self.choosers is not None:
            out.set(INIT_STATE_KEY, torch.from_numpy(self._init_ids.copy()).unsqueeze(-1))
        return out

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        mask = None
        if tensordict is not None and "_reset" in tensordict.keys():
            mask = tensordict.get("_reset").reshape(-1)
        for i, env in enumerate(self.envs):
            if mask is not None and not bool(mask[i]):
                continue
            if self.choosers is not None:  # fixed layout k = the scene minigrid makes from seed k
                self._init_ids[i] = seed = self.choosers[i].next()
            else:
                seed = None if self._seeded else self._base_seed + i
            obs, _ = env.reset(seed=seed)
            self._views[i], self._missions[i] = obs["image"], obs["mission"]
        self._seeded = True
        out = self._obs()
        false = torch.zeros(*self.batch_size, 1, dtype=torch.bool)
        out.update({"done": false, "terminated": false.clone(), "truncated": false.clone(),
                    "success": false.clone()})
        return out

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        actions = tensordict.get("action").reshape(-1).tolist()
        n = len(self.envs)
        reward = np.zeros(n, np.float32)
        term, trunc, succ = (np.zeros(n, bool) for _ in range(3))
        for i, (env, a) in enumerate(zip(self.envs, actions)):
            obs, r, te, tr, info = env.step(a)
            self._views[i], self._missions[i] = obs["image"], obs["mission"]
            reward[i], term[i], trunc[i] = r, te, tr
            succ[i] = info.get("success", te and r > 0)
        out = self._obs()
        out.update({
            "reward": torch.from_numpy(reward).unsqueeze(-1),
            "terminated": torch.from_numpy(term).unsqueeze(-1),
            "truncated": torch.from_numpy(trunc).unsqueeze(-1),
            "done": torch.from_numpy(term | trunc).unsqueeze(-1),
            "success": torch.from_numpy(succ).unsqueeze(-1),
        })
        return out
