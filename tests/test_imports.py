"""The pure math never pulls in ray or deepspeed (STYLE.md habit 1)."""

import subprocess
import sys


def test_policy_rewards_and_grpo_do_not_import_ray_or_deepspeed():
    code = (
        "import sys\n"
        "import policy, policy.sde, policy.sampler, policy.logprob, policy.pipeline, policy.tiny\n"
        "import rewards.self_confidence, learner.grpo\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed'))\n"
        "print(','.join(heavy))\n"
    )
    # A fresh interpreter: this test process may already have imported ray elsewhere.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout.strip()}"
