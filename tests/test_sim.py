"""Closed-loop evaluation in Meta-World (vla_ds.sim): the recorder's LeRobot dataset, the
observation contract against the dataset reader, a policy trained a few steps on the
recording and evaluated in-process and through the policy server, the baselines, the
report layout, videos and seeds that reproduce. Small: 64 px images, fast rendering."""

import json
import math

import numpy as np
import pytest

pytest.importorskip("metaworld")  # the "sim" extra; .ci/run installs it

from conftest import REPO

from vla_ds.data import DataConfig, VLADataset
from vla_ds.data.lerobot import FrameHistory, LeRobotConfig, load_lerobot_episodes
from vla_ds.errors import ConfigError
from vla_ds.sim import metaworld
from vla_ds.sim.cli import eval_main, record_main
from vla_ds.sim.envs import EnvPool

SIZE = "64"
COMMON = ["--image-size", SIZE, "--rendering", "fast", "--no-progress"]
WINDOW = 3


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "reach_demos"
    assert record_main(["--output", str(out), "--tasks", "reach", "--episodes", "2", "--seed", "5",
                        "--n-envs", "2", "--cameras", "corner2,topview", *COMMON]) == 0
    return out


@pytest.fixture(scope="module")
def policy_dir(recording, tiny_backbone_dir, tmp_path_factory):
    """A tiny Stage 1 policy trained a few steps on the recording, the state as its sensor stream."""
    from vla_ds.policy_tools.convert import main as convert_main
    from vla_ds.training.train import main as train_main

    run = tmp_path_factory.mktemp("sim_run") / "stage1"
    assert train_main(["--ds_config", str(REPO / "ds_configs" / "stage1.json"), "--dataset_dir", str(recording),
                       "--vl-model", str(tiny_backbone_dir), "--model-preset", "tiny", "--sensor-window-size",
                       str(WINDOW), "--num_workers", "0", "--batch_size", "8", "--epochs", "1", "--val_split", "0",
                       "--lr", "1e-3", "--output_dir", str(run), "--set", "train.progress_bar=false",
                       "--set", 'data.lerobot.sensor_features=["observation.state"]']) == 0
    out = run.parent / "policy"
    assert convert_main([str(run), str(out), "--to", "policy"]) == 0
    return out


def test_task_names_and_groups():
    assert metaworld.task_name("reach") == metaworld.task_name("metaworld-reach-v3") == "reach-v3"
    tasks = metaworld.resolve_tasks("reach-v3,easy,button-press")
    assert tasks[0] == ("reach-v3", "reach-v3") and ("easy", "reach-v3") in tasks
    assert len([t for g, t in tasks if g == "easy"]) == 28 and tasks[-1] == ("button-press-v3", "button-press-v3")
    assert len(metaworld.resolve_tasks("mt50")) == 50 and len(metaworld.resolve_tasks("mt10")) == 10
    assert metaworld.expert_policy("peg-insert-side").__class__.__name__ == "SawyerPegInsertionSideV3Policy"


def test_recording_is_a_lerobot_dataset_that_replays(recording):
    info = json.loads((recording / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == metaworld.FPS and info["total_episodes"] == 2
    # lerobot/metaworld_mt50's features (the camera as a video) with a second camera, then LeRobot's defaults.
    assert list(info["features"])[:8] == ["observation.image", "observation.images.topview", "observation.state",
                                          "observation.environment_state", "action", "next.reward", "next.success",
                                          "task_id"]
    assert info["features"]["observation.image"]["shape"] == info["features"]["observation.images.topview"][
        "shape"] == [64, 64, 3]
    summary = json.loads((recording / "meta/vla_ds_recording.json").read_text())
    seeds = summary["tasks"]["reach-v3"]["saved_seeds"]
    assert sorted(seeds) == seeds[:2] and all(5 <= s < metaworld.EVAL_START_SEED for s in seeds)
    episodes = load_lerobot_episodes(recording, LeRobotConfig(sensor_features=["observation.state"]))
    assert [e.instruction for e in episodes] == ["Reach a goal position"] * 2
    import pyarrow.parquet as pq

    table = pq.read_table(recording / "data/chunk-000/file-000.parquet").to_pydict()
    # Replaying the recorded actions from each saved seed gives the recorded states, frame by frame,
    # and the same window the training samples cut: the evaluator keeps the raw frames (FrameHistory)
    # and the policy's transform, recorded from the dataset, makes the window of them.
    data = VLADataset(DataConfig(dataset_dir=str(recording), sensor_window_size=WINDOW, action_horizon=4,
                                 lerobot=LeRobotConfig(sensor_features=["observation.state"])))
    with EnvPool("reach-v3", 1, 64, "fast", cameras=("corner2", "topview")) as pool:
        for e, (episode, seed) in enumerate(zip(episodes, seeds)):
            rows = [i for i, ep in enumerate(table["episode_index"]) if ep == e]
            actions = np.array([table["action"][i] for i in rows], dtype=np.float32)
            assert table["next.success"][rows[-1]] and not any(table["next.success"][i] for i in rows[:-1])
            history = FrameHistory(["observation.state"], WINDOW)
            transform = data.episodes[e].sensor.transform
            (obs, image), = pool.reset([seed], render={0})
            for k, i in enumerate(rows):
                frame = metaworld.lerobot_frame(obs, image)
                np.testing.assert_array_equal(frame["observation.state"], table["observation.state"][i])
                history.append(frame)
                window, pad = transform.window(history.state(), WINDOW)
                sample = data[sum(len(ep.timestamps) for ep in episodes[:e]) + k]
                np.testing.assert_array_equal(window, sample["sensor_window"])
                if k == 0:  # each camera's view, through the video codec: the same picture, and two pictures
                    views = [frame["observation.image"], frame["observation.images.topview"]]
                    decoded = [np.asarray(v, dtype=float) for v in sample["images"]]
                    assert max(np.abs(d - v).mean() for d, v in zip(decoded, views)) < 8.0
                    assert np.abs(decoded[0] - views[1]).mean() > 30
                assert pad == sample["sensor_pad"] == max(0, WINDOW - 1 - k)
                result = pool.step({0: actions[k]})[0]
                obs, image = result.obs, None
            assert result.success  # the same episode, to its success


def _raw_metaworld_expert(task: str, seeds: list[int]) -> list[tuple[int, float]]:
    """(steps, reward sum) of the scripted expert from each seed, set up as LeRobot's MetaworldEnv
    does, straight on Meta-World's API: the yardstick for the evaluator's environment adapter."""
    import warnings

    import metaworld
    import metaworld.policies

    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
    mt1 = metaworld.MT1(task, seed=42)
    env = mt1.train_classes[task]()
    env.set_task(mt1.train_tasks[0])
    env.reset()
    env._freeze_rand_vec, env.seeded_rand_vec = False, True
    expert = metaworld.policies.SawyerReachV3Policy()
    out = []
    for seed in seeds:
        env.seed(seed)
        obs, _ = env.reset()
        total = 0.0
        for t in range(1, 501):
            obs, reward, _, _, info = env.step(expert.get_action(obs))
            total += reward
            if info["success"]:
                break
        out.append((t, total))
    env.close()
    return out


@pytest.mark.parametrize("task", ["reach-v3", "push-v3"])
def test_the_goal_marker_is_where_the_goal_is_from_the_first_frame(task):
    """Meta-World's reset moves the goal in the model, and its marker in the rendered scene only
    at the first step: the first frame, the one a policy plans its first chunk from, would show
    it elsewhere. After MetaWorldEnv.reset the marker (what the renderer draws) is at the
    observation's goal. (Not rendered here: one renderer per process is the workers'.)"""
    env = metaworld.MetaWorldEnv(task, image_size=32, rendering="fast")
    try:
        for seed in (3, 4):
            obs = env.reset(seed)
            np.testing.assert_allclose(env.env.data.site("goal").xpos, obs[36:39], atol=1e-9)
    finally:
        env.close()


def test_baselines_expert_succeeds_zero_fails(tmp_path):
    out = tmp_path / "expert"
    assert eval_main(["--policy", "expert", "--tasks", "reach-v3", "--episodes", "2", "--videos", "0",
                      "--output", str(out), *COMMON]) == 0
    info = json.loads((out / "eval_info.json").read_text())
    assert info["overall"]["pc_success"] == 100.0 and info["per_task"][0]["metrics"]["seeds"] == [1000, 1001]
    metrics = info["per_task"][0]["metrics"]
    assert list(zip(metrics["steps"], metrics["sum_rewards"])) == _raw_metaworld_expert("reach-v3", [1000, 1001])
    out = tmp_path / "zero"
    assert eval_main(["--policy", "zero", "--tasks", "reach-v3", "--episodes", "1", "--max-steps", "30",
                      "--videos", "0", "--output", str(out), *COMMON]) == 0
    info = json.loads((out / "eval_info.json").read_text())
    assert info["overall"]["pc_success"] == 0.0 and info["per_task"][0]["metrics"]["steps"] == [30]


def test_blind_replay_of_a_recorded_seed_succeeds_again(recording, tmp_path):
    """Replaying recorded actions from the seeds they were recorded at succeeds (the physics is
    deterministic); from other seeds it need not."""
    seeds = json.loads((recording / "meta/vla_ds_recording.json").read_text())["tasks"]["reach-v3"]["saved_seeds"]
    out = tmp_path / "replay"
    assert eval_main(["--policy", f"replay:{recording}", "--tasks", "reach-v3", "--episodes", "2", "--seed",
                      str(seeds[0]), "--videos", "0", "--output", str(out), *COMMON]) == 0
    info = json.loads((out / "eval_info.json").read_text())
    assert seeds == [5, 6] and info["per_task"][0]["metrics"]["successes"] == [True, True]


def _eval(out, *who, episodes="2", n_envs="1", videos="1", baselines="none"):
    args = [*who, "--tasks", "reach-v3", "--episodes", episodes, "--n-envs", n_envs, "--max-steps", "20",
            "--execute-steps", "4", "--videos", videos, "--baselines", baselines, "--output", str(out), *COMMON]
    assert eval_main(args) == 0
    return json.loads((out / "eval_info.json").read_text())


@pytest.fixture(scope="module")
def local_run(policy_dir, tmp_path_factory):
    """The policy in this process on two seeds: no videos, no baselines."""
    return _eval(tmp_path_factory.mktemp("local") / "eval", "--policy", str(policy_dir), videos="0")


def test_policy_in_process_report_video_and_seeds(policy_dir, local_run, tmp_path, capsys):
    import av

    info = _eval(tmp_path / "a", "--policy", str(policy_dir), baselines="zero,replay")
    printed = capsys.readouterr().out.splitlines()
    header = next(line for line in printed if line.startswith("task"))
    assert header.split()[-2:] == ["zero", "replay"] and "95% interval" in header
    for name in ("zero", "replay"):  # the baselines on the same tasks and seeds, beside the policy
        assert info["baselines"][name]["per_task"]["reach-v3"]["n_episodes"] == 2
        assert json.loads((tmp_path / "a" / "baselines" / name / "eval_info.json").read_text())["per_task"][0][
            "metrics"]["seeds"] == [1000, 1001]
    assert info["baselines"]["zero"]["overall"]["pc_success"] == 0.0
    task = info["per_task"][0]
    assert task["task_group"] == "reach-v3" and task["task"] == "reach-v3" and task["n_episodes"] == 2
    metrics = task["metrics"]
    assert metrics["seeds"] == [1000, 1001] and metrics["steps"] == [20, 20] and len(metrics["successes"]) == 2
    assert task["pc_success"] == 50.0 * sum(metrics["successes"])
    for agg in (info["per_group"]["reach-v3"], info["overall"]):
        assert agg["n_episodes"] == 2 and math.isclose(agg["avg_sum_reward"], np.mean(metrics["sum_rewards"]))
        assert agg["avg_max_reward"] == np.mean(metrics["max_rewards"])
        lo, hi = agg["pc_success_ci95"]
        assert 0 <= lo <= agg["pc_success"] <= hi <= 100
    assert info["overall"]["eval_s"] > 0 and info["overall"]["eval_ep_s"] == info["overall"]["eval_s"] / 2
    assert (tmp_path / "a" / "success.png").stat().st_size > 0
    (video,) = info["overall"]["video_paths"]
    with av.open(video) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 21  # 20 steps and the last observation
    assert frames[0].shape[0] >= 256 and frames[0].shape[1] > frames[0].shape[0]  # view + chunk panel
    assert np.abs(frames[1].astype(int) - frames[10]).mean() > 0  # the arm moves
    # The same seeds give the same episodes (filming renders every step; the policy sees the same).
    assert local_run["per_task"][0]["metrics"]["sum_rewards"] == metrics["sum_rewards"]


def test_server_gives_the_in_process_result(policy_dir, local_run, tmp_path):
    from vla_ds.models.policy import VLAPolicy
    from vla_ds.serving.server import PolicyServer, ServeConfig

    local = local_run
    server = PolicyServer(VLAPolicy.from_pretrained(policy_dir), ServeConfig(port=0))
    # The raw contract: the policy asks for the raw 4-D state and makes its window itself.
    assert server.metadata["camera_views"] == ["observation.image", "observation.images.topview"]
    state = server.metadata["state"]
    assert server.metadata["lerobot"] is None and list(state["features"]) == ["observation.state"]
    assert state["features"]["observation.state"]["size"] == metaworld.STATE_DIM
    with server.running() as port:
        served = _eval(tmp_path / "served", "--server", f"127.0.0.1:{port}", videos="0")
        assert server.counters["requests"] == 2 * 5  # 20 steps, 4 actions per chunk
    for key in ("sum_rewards", "max_rewards", "successes", "steps"):
        assert served["per_task"][0]["metrics"][key] == local["per_task"][0]["metrics"][key], key


def test_bad_input_is_one_line(recording, policy_dir, tmp_path, capsys):
    assert eval_main(["--policy", "zero", "--tasks", "reach-v3,nope", "--output", str(tmp_path / "x")]) == 2
    assert "unknown Meta-World task 'nope'" in capsys.readouterr().err
    assert eval_main(["--policy", "zero", "--max-steps", "501", "--output", str(tmp_path / "x"), *COMMON]) == 2
    assert "--max-steps must be at most 500" in capsys.readouterr().err
    assert eval_main(["--policy", str(policy_dir), "--execute-steps", "9", "--output", str(tmp_path / "x"),
                      *COMMON]) == 2
    assert "--execute-steps must be in 1..8" in capsys.readouterr().err
    assert eval_main(["--server", "127.0.0.1:1", "--connect-timeout", "0", "--output", str(tmp_path / "y"),
                      *COMMON]) == 2
    assert "--server 127.0.0.1:1: cannot connect" in capsys.readouterr().err
    assert record_main(["--output", str(recording), "--episodes", "1", *COMMON]) == 2
    assert f"{recording}: exists and is not an empty directory" in capsys.readouterr().err
    assert record_main(["--output", str(tmp_path / "z"), "--episodes", "400", *COMMON]) == 2
    assert "reach the evaluation seeds" in capsys.readouterr().err
    assert record_main(["--output", str(tmp_path / "z"), "--cameras", "topview,corner2", *COMMON]) == 2
    assert "--cameras must start with LeRobot's camera corner2" in capsys.readouterr().err
    assert record_main(["--output", str(tmp_path / "z"), "--cameras", "corner2,side", *COMMON]) == 2
    assert "unknown Meta-World camera 'side'" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
    from types import SimpleNamespace

    from vla_ds.sim.policies import ChunkingPolicy

    with pytest.raises(ConfigError, match=r"reads camera view\(s\) observation.images.wrist; Meta-World renders"):
        ChunkingPolicy("p", model=SimpleNamespace(metadata={"camera_views": ["observation.image",
                                                                            "observation.images.wrist"],
                                                            "action_horizon": 4}))
