"""Ad-hoc (session 9): where a plateau policy fails. 512 sampled episodes of the run's first task;
success split by whether the target is in the 7x7 view at the start; failures whose target was
never in view. Usage: python docs/data/quickstart_threshold/plateau_failures.py RUN_DIR"""
import sys, torch
sys.path.insert(0, __import__('os').path.abspath(__file__).rsplit('/docs/', 1)[0])
from datamodules.tasks import make_env, parse_stream
from scripts.greedy_actions import load_policy
torch.set_num_threads(2)
policy, cfg, path = load_policy(sys.argv[1])
task = parse_stream(cfg["data"]["stream"])[0]
n = 512
torch.manual_seed(1); env = make_env(task, n, 999)
td = env.reset()
def target_pos(e):
    return next((x, y) for x in range(e.width) for y in range(e.height)
                if (o := e.grid.get(x, y)) is not None and f"{o.color} {o.type}" == e.target)
vis0 = torch.tensor([bool(e.in_view(*target_pos(e))) for e in env.envs])
prompts = policy.encode([task.instruction] * n)
finished = torch.zeros(n, dtype=torch.bool); success = torch.zeros(n, dtype=torch.bool); steps = torch.zeros(n)
ever_vis = vis0.clone()
with torch.no_grad():
    while not finished.all():
        out = policy.act(td.get(("observation", "image")), prompts, greedy=False)
        td = env.step(td.set("action", policy.env_action(out.tokens)))["next"]
        done = td.get("done").reshape(-1)
        first = done & ~finished
        success |= first & td.get("success").reshape(-1)
        steps += (~finished).float()
        finished |= done
        for i, e in enumerate(env.envs):
            if not finished[i]: ever_vis[i] |= bool(e.in_view(*target_pos(e)))
print(path)
print(f"success {success.float().mean():.3f}; target visible at start {vis0.float().mean():.2f}")
print(f"success | visible at start {success[vis0].float().mean():.3f}  (n={int(vis0.sum())})")
print(f"success | not visible at start {success[~vis0].float().mean():.3f}  (n={int((~vis0).sum())})")
print(f"failures where the target was never in view: {int((~success & ~ever_vis).sum())} of {int((~success).sum())}")
print(f"mean steps success {steps[success].mean():.1f} failure {steps[~success].mean():.1f}")
