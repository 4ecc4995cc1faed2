"""Meta-World with LeRobot's observation protocol (``lerobot/envs/metaworld.py``).

What a policy trained on ``lerobot/metaworld_mt50`` sees in ``lerobot-eval --env.type=metaworld``,
reproduced here (read from LeRobot's and Meta-World 3.1's sources; docs/sim.md lists each point):

- the task's environment from ``metaworld.MT1(task, seed=42)``, its first train task set,
  then random object and goal placement drawn from the environment's own seeded generator:
  ``env.seed(seed)`` before every reset (Meta-World's ``reset(seed=...)`` ignores the seed);
- camera ``corner2`` moved to (0.75, 0.075, 0.7), its render flipped on both axes
  (``observation.image``, uint8 (S, S, 3); LeRobot renders 480 x 480);
- ``observation.state``: the first 4 values of Meta-World's observation (hand xyz and the
  gripper opening), float32; ``observation.environment_state``: all 39;
- actions: 4-D (hand dx, dy, dz, gripper) in [-1, 1], 80 steps per second, at most 500 steps;
- success: any step's ``info["success"]``; the episode ends at the first one;
- the instruction: LeRobot's description of the task (:data:`TASK_DESCRIPTIONS`);
- evaluation seeds start at 1000 (``lerobot-eval``'s default ``--seed``), one per episode.

:func:`lerobot_frame` is the one mapping from the simulator to a LeRobot frame: the recorder
writes exactly these frames, and the evaluator builds its requests from them through the
dataset reader's own code (:class:`vla_ds.data.lerobot.FrameHistory`).

Importing this module does not import Meta-World or MuJoCo; :class:`MetaWorldEnv` does, in
the process that owns the environment (one per process: several MuJoCo renderers in one
process have been seen to corrupt each other's images).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from vla_ds.errors import ConfigError

ENV_NAME = "metaworld"
ROBOT_TYPE = "metaworld"
CAMERA = "corner2"
CAMERA_POS = (0.75, 0.075, 0.7)  # LeRobot moves corner2 here
FPS = 80                         # Meta-World's render_fps (frame_skip 5 x 2.5 ms)
MAX_EPISODE_STEPS = 500          # MT1's max_path_length
ACTION_DIM = 4
STATE_DIM = 4
ENV_STATE_DIM = 39
DEFAULT_IMAGE_SIZE = 480         # LeRobot's observation_width / height
# "lerobot": Meta-World's scene as it is, what LeRobot renders. "fast": no shadows and no
# reflections, 3-4x faster on a CPU renderer (llvmpipe: 80 -> 23 ms a frame); a policy must
# be evaluated with the rendering its data was recorded with.
RENDERINGS = ("lerobot", "fast")
EVAL_START_SEED = 1000           # lerobot-eval's default --seed
# What an episode's first frame shows (recorded with the data): this episode's goal marker.
# Meta-World itself, and so LeRobot, renders the previous episode's there (MetaWorldEnv.reset).
RESET_FRAME = "goal placed at reset"
MT1_SEED = 42                    # LeRobot's metaworld.MT1(task, seed=42)

IMAGE_KEY = "observation.image"
# Every Meta-World v3 scene's cameras. corner2 is LeRobot's (IMAGE_KEY); a recording may add
# others as observation.images.<camera>, rendered the same way (turned 180 degrees upright).
CAMERA_NAMES = ("corner2", "corner", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
STATE_KEY = "observation.state"
ENV_STATE_KEY = "observation.environment_state"
ACTION_KEY = "action"
ACTION_NAMES = ["x", "y", "z", "gripper"]

# LeRobot's src/lerobot/envs/metaworld_config.json: the instruction of each task, the task ids
# of lerobot/metaworld_mt50, the difficulty groups and the scripted expert of each task.
TASK_DESCRIPTIONS = {
    "assembly-v3": "Pick up a nut and place it onto a peg",
    "basketball-v3": "Dunk the basketball into the basket",
    "bin-picking-v3": "Grasp the puck from one bin and place it into another bin",
    "box-close-v3": "Grasp the cover and close the box with it",
    "button-press-topdown-v3": "Press a button from the top",
    "button-press-topdown-wall-v3": "Bypass a wall and press a button from the top",
    "button-press-v3": "Press a button",
    "button-press-wall-v3": "Bypass a wall and press a button",
    "coffee-button-v3": "Push a button on the coffee machine",
    "coffee-pull-v3": "Pull a mug from a coffee machine",
    "coffee-push-v3": "Push a mug under a coffee machine",
    "dial-turn-v3": "Rotate a dial 180 degrees",
    "disassemble-v3": "Pick a nut out of a peg",
    "door-close-v3": "Close a door with a revolving joint",
    "door-lock-v3": "Lock the door by rotating the lock clockwise",
    "door-open-v3": "Open a door with a revolving joint",
    "door-unlock-v3": "Unlock the door by rotating the lock counter-clockwise",
    "hand-insert-v3": "Insert the gripper into a hole",
    "drawer-close-v3": "Push and close a drawer",
    "drawer-open-v3": "Open a drawer",
    "faucet-open-v3": "Rotate the faucet counter-clockwise",
    "faucet-close-v3": "Rotate the faucet clockwise",
    "hammer-v3": "Hammer a screw on the wall",
    "handle-press-side-v3": "Press a handle down sideways",
    "handle-press-v3": "Press a handle down",
    "handle-pull-side-v3": "Pull a handle up sideways",
    "handle-pull-v3": "Pull a handle up",
    "lever-pull-v3": "Pull a lever down 90 degrees",
    "peg-insert-side-v3": "Insert a peg sideways",
    "pick-place-wall-v3": "Pick a puck, bypass a wall and place the puck",
    "pick-out-of-hole-v3": "Pick up a puck from a hole",
    "reach-v3": "Reach a goal position",
    "push-back-v3": "Push the puck to a goal",
    "push-v3": "Push the puck to a goal",
    "pick-place-v3": "Pick and place a puck to a goal",
    "plate-slide-v3": "Slide a plate into a cabinet",
    "plate-slide-side-v3": "Slide a plate into a cabinet sideways",
    "plate-slide-back-v3": "Get a plate from the cabinet",
    "plate-slide-back-side-v3": "Get a plate from the cabinet sideways",
    "peg-unplug-side-v3": "Unplug a peg sideways",
    "soccer-v3": "Kick a soccer into the goal",
    "stick-push-v3": "Grasp a stick and push a box using the stick",
    "stick-pull-v3": "Grasp a stick and pull a box with the stick",
    "push-wall-v3": "Bypass a wall and push a puck to a goal",
    "reach-wall-v3": "Bypass a wall and reach a goal",
    "shelf-place-v3": "Pick and place a puck onto a shelf",
    "sweep-into-v3": "Sweep a puck into a hole",
    "sweep-v3": "Sweep a puck off the table",
    "window-open-v3": "Push and open a window",
    "window-close-v3": "Push and close a window",
}
# Alphabetical, but for the last two.
TASK_NAME_TO_ID = {name: i for i, name in enumerate(sorted(TASK_DESCRIPTIONS))} | {"window-open-v3": 48,
                                                                                "window-close-v3": 49}
GROUPS = {
    "easy": ["button-press-v3", "button-press-topdown-v3", "button-press-topdown-wall-v3", "button-press-wall-v3",
             "coffee-button-v3", "dial-turn-v3", "door-close-v3", "door-lock-v3", "door-open-v3", "door-unlock-v3",
             "drawer-close-v3", "drawer-open-v3", "faucet-close-v3", "faucet-open-v3", "handle-press-v3",
             "handle-press-side-v3", "handle-pull-v3", "handle-pull-side-v3", "lever-pull-v3", "plate-slide-v3",
             "plate-slide-back-v3", "plate-slide-back-side-v3", "plate-slide-side-v3", "reach-v3", "reach-wall-v3",
             "window-close-v3", "window-open-v3", "peg-unplug-side-v3"],
    "medium": ["basketball-v3", "bin-picking-v3", "box-close-v3", "coffee-pull-v3", "coffee-push-v3", "hammer-v3",
               "peg-insert-side-v3", "push-wall-v3", "soccer-v3", "sweep-v3", "sweep-into-v3"],
    "hard": ["assembly-v3", "hand-insert-v3", "pick-out-of-hole-v3", "pick-place-v3", "push-v3", "push-back-v3"],
    "very_hard": ["shelf-place-v3", "disassemble-v3", "stick-pull-v3", "stick-push-v3", "pick-place-wall-v3"],
    # Meta-World's own MT10 (metaworld.env_dict.MT10_V3) and all 50 tasks.
    "mt10": ["reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
             "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3"],
    "mt50": sorted(TASK_DESCRIPTIONS),
}


def _expert_class_name(task: str) -> str:
    """Meta-World's scripted expert class of a task (LeRobot's TASK_POLICY_MAPPING), e.g.
    ``SawyerReachV3Policy``; one irregular name."""
    if task == "peg-insert-side-v3":
        return "SawyerPegInsertionSideV3Policy"
    return "Sawyer" + "".join(part.capitalize() for part in task[:-3].split("-")) + "V3Policy"


def task_name(name: str) -> str:
    """A task's canonical name: ``reach``, ``reach-v3`` and ``metaworld-reach-v3`` are ``reach-v3``."""
    name = name.strip()
    if name.startswith("metaworld-"):
        name = name[len("metaworld-"):]
    if name not in TASK_DESCRIPTIONS and f"{name}-v3" in TASK_DESCRIPTIONS:
        name = f"{name}-v3"
    if name not in TASK_DESCRIPTIONS:
        close = [t for t in TASK_DESCRIPTIONS if name.split("-v")[0] in t][:5]
        raise ConfigError(f"unknown Meta-World task {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                          + f"; tasks are the 50 of MT50 or a group: {', '.join(GROUPS)}")
    return name


def resolve_tasks(spec: str) -> list[tuple[str, str]]:
    """``--tasks`` -> [(group, task), ...]: a comma-separated list of task names and groups
    (easy, medium, hard, very_hard, mt10, mt50). A task named on its own is its own group, as
    in lerobot-eval."""
    out: list[tuple[str, str]] = []
    for item in (s.strip() for s in str(spec).split(",")):
        if not item:
            continue
        if item in GROUPS:
            out += [(item, t) for t in GROUPS[item]]
        else:
            task = task_name(item)
            out.append((task, task))
    if not out:
        raise ConfigError(f"--tasks names no task: {spec!r}")
    seen = set()
    unique = [(g, t) for g, t in out if not ((g, t) in seen or seen.add((g, t)))]
    return unique


def camera_key(camera: str) -> str:
    """The dataset feature of a camera: ``observation.image`` for LeRobot's corner2,
    ``observation.images.<camera>`` for another."""
    if camera not in CAMERA_NAMES:
        raise ConfigError(f"unknown Meta-World camera {camera!r}; the cameras are {', '.join(CAMERA_NAMES)}")
    return IMAGE_KEY if camera == CAMERA else f"observation.images.{camera}"


def key_camera(key: str) -> str | None:
    """The camera a dataset feature (a policy's camera view) is rendered by, or None."""
    if key == IMAGE_KEY:
        return CAMERA
    camera = key.removeprefix("observation.images.")
    return camera if camera != key and camera in CAMERA_NAMES and camera != CAMERA else None


def parse_cameras(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``corner2,corner`` -> ("corner2", "corner"): LeRobot's corner2 first, no repeats."""
    names = [c.strip() for c in (spec.split(",") if isinstance(spec, str) else spec) if c.strip()]
    for name in names:
        camera_key(name)
    if not names or names[0] != CAMERA or len(set(names)) != len(names):
        raise ConfigError(f"--cameras must start with LeRobot's camera {CAMERA} and name each camera once, got "
                          f"{','.join(names) or 'none'}")
    return tuple(names)


def dataset_features(image_size: int, camera_dtype: str = "video",
                     cameras: Sequence[str] = (CAMERA,)) -> dict[str, dict]:
    """The features of ``lerobot/metaworld_mt50`` (its meta/info.json) for a recording at
    ``image_size``: the corner2 camera, the 4-D state, the 39-D environment state, the 4-D
    action, ``next.reward``, ``next.success`` and the MT50 ``task_id``. The camera is a video
    here (the hub copy stores PNG images: ``camera_dtype="image"``). Further ``cameras``
    follow corner2 as ``observation.images.<camera>``."""
    image = {"dtype": camera_dtype, "shape": [image_size, image_size, 3], "names": ["height", "width", "channels"]}
    return {
        IMAGE_KEY: image,
        **{camera_key(c): dict(image) for c in cameras if c != CAMERA},
        STATE_KEY: {"dtype": "float32", "shape": [STATE_DIM], "names": {"axes": None}},
        ENV_STATE_KEY: {"dtype": "float32", "shape": [ENV_STATE_DIM], "names": ["keypoints"]},
        ACTION_KEY: {"dtype": "float32", "shape": [ACTION_DIM], "names": {"axes": list(ACTION_NAMES)}},
        "next.reward": {"dtype": "float32", "shape": [1], "names": None},
        "next.success": {"dtype": "bool", "shape": [1], "names": None},
        "task_id": {"dtype": "int16", "shape": [1], "names": None},
    }


def lerobot_frame(raw_obs: np.ndarray, images: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """The LeRobot frame of one Meta-World observation: its camera images (``observation.image``,
    the flipped corner2 render, and any other camera's; absent when not rendered),
    ``observation.state`` (hand xyz + gripper) and ``observation.environment_state`` (all 39
    values), float32 as the dataset stores them."""
    frame: dict[str, Any] = {STATE_KEY: np.asarray(raw_obs[:STATE_DIM], dtype=np.float32),
                             ENV_STATE_KEY: np.asarray(raw_obs[:ENV_STATE_DIM], dtype=np.float32)}
    if images:
        frame.update(images)
    return frame


class MetaWorldEnv:
    """One Meta-World task as LeRobot's ``MetaworldEnv`` sets it up (module docstring).

    ``reset(seed)`` -> the raw 39-D observation; ``step(action)`` -> (observation, reward,
    success, truncated); ``render()`` -> {dataset key: uint8 (S, S, 3)} of each of ``cameras``,
    flipped as LeRobot flips corner2. Create one per process.
    """

    def __init__(self, task: str, image_size: int = DEFAULT_IMAGE_SIZE, cameras: Sequence[str] = (CAMERA,),
                 rendering: str = "lerobot"):
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless; osmesa also works (docs/sim.md)
        import metaworld
        import mujoco

        self.task = task_name(task)
        self.description = TASK_DESCRIPTIONS[self.task]
        mt1 = metaworld.MT1(self.task, seed=MT1_SEED)
        env = mt1.train_classes[self.task](render_mode="rgb_array", camera_name=CAMERA, width=image_size,
                                           height=image_size)
        env.set_task(mt1.train_tasks[0])
        self.camera_ids = {camera_key(c): mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_CAMERA, c)
                           for c in cameras}  # dataset key -> camera
        # LeRobot writes cam_pos[2]: corner2's index in every Meta-World v3 model
        env.model.cam_pos[mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_CAMERA, CAMERA)] = CAMERA_POS
        if rendering == "fast":
            env.model.light_castshadow[:] = 0
            env.model.mat_reflectance[:] = 0
        elif rendering != "lerobot":
            raise ConfigError(f"rendering must be one of {RENDERINGS}, got {rendering!r}")
        env.reset()
        env._freeze_rand_vec = False  # place objects and goals at random ...
        env.seeded_rand_vec = True    # ... from the generator env.seed() resets
        self.env = env
        self.max_episode_steps = int(env.max_path_length)

    def reset(self, seed: int | None) -> np.ndarray:
        if seed is not None:
            self.env.seed(int(seed))
        obs, _ = self.env.reset()
        # Meta-World's reset moves the goal in the model, but the rendered marker follows only at
        # the first step, which places the target sites again: the reset frame would show the
        # previous episode's goal. Placed now, as step places them (the observation is unchanged).
        for site in self.env._target_site_config:
            self.env._set_pos_site(*site)
        return np.asarray(obs, dtype=np.float64)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool]:
        obs, reward, _, truncated, info = self.env.step(np.asarray(action, dtype=np.float32))
        return np.asarray(obs, dtype=np.float64), float(reward), bool(info.get("success", 0)), bool(truncated)

    def render(self) -> dict[str, np.ndarray]:
        images = {}
        for key, camera_id in self.camera_ids.items():
            self.env.mujoco_renderer.camera_id = camera_id  # gymnasium's renderer reads it on every render
            # Meta-World's cameras render upside down and mirrored (LeRobot flips corner2 back)
            images[key] = np.ascontiguousarray(np.flip(self.env.render(), (0, 1)))
        return images

    def close(self) -> None:
        self.env.close()


def expert_policy(task: str):
    """Meta-World's scripted expert of ``task``: ``get_action(raw_obs) -> (4,)`` in [-1, 1]."""
    import warnings

    import metaworld.policies as policies

    # Its action helper warns, every step, that some gains exceed what the environment clips to.
    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)

    return getattr(policies, _expert_class_name(task_name(task)))()
