# GRPO on the small models with the task's verifiable reward (the judge of tasks/pycode.py): no critic, no reward
# model; 8 samples of each prompt, each judged against the others.
# python train_grpo.py config/grpo_small.py        (after config/sft_small.py)
out_dir = "out/grpo_small"
init_from = "out/sft_small"
reward_model = "out/rm_small"  # read only with reward='model'
reward = "task"
advantage = "grpo"
max_iters = 24
eval_interval = 24
batch_size = 8  # prompts per rollout...
group_size = 8  # ...times 8 samples each: 64 responses per iteration
max_new_tokens = 96
temperature = 1.0
learning_rate = 1e-4
kl = "none"  # beta = 0, as trl's default: the reference is loaded only to measure the KL at evaluations
missing_eot_penalty = -1.0
device = "cpu"
