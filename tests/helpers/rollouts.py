"""One real BabyAI rollout of a module's acting policy, through a TorchRL Collector."""
from torchrl.collectors import Collector

from datamodules.babyai import BabyAIEnv


def babyai_rollout(module, target="green key", n_env=4, T=8):
    """``n_env`` x ``T`` frames of GoToObjectRoom(``target``) collected with ``module.acting_policy()``."""
    env = BabyAIEnv(target=target, num_envs=n_env, seed=0)
    c = Collector(env, module.acting_policy(), frames_per_batch=n_env * T, total_frames=-1)
    batch = next(iter(c))
    c.shutdown()
    return batch
