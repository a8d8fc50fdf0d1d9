# GRPO on the small models with the task's verifiable reward (the judge of tasks/pycode.py): no critic, no reward
# model; 4 samples of each of 16 prompts per iteration, each sample judged against the other three. About a
# minute and a half per run on a 2-core CPU with bfloat16.
# python train_grpo.py config/grpo_small.py        (after config/sft_small.py)
out_dir = "out/grpo_small"
init_from = "out/sft_small"
reward_model = "out/rm_small"  # read only with reward='model'
reward = "task"
template_window = 256  # the judge sees each rollout beside the last 256 responses: templates across rollouts score 0
advantage = "grpo"
max_iters = 30
eval_interval = 30  # before and after
batch_size = 16  # more prompts per rollout, fewer samples each: templates show across prompts
group_size = 4
max_new_tokens = 64  # as every stage
eval_samples = 4  # pass@4 and the KL to SFT at each evaluation
temperature = 1.0
learning_rate = 1e-4
kl = "none"  # beta = 0, as trl's default: the reference is loaded only to measure the KL at evaluations
missing_eot_penalty = -1.0
device = "cpu"
