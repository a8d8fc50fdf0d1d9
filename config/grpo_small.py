# GRPO on the small models with the task's verifiable reward (the judge of tasks/pycode.py): no critic, no reward
# model; 4 samples of each of 16 prompts per iteration, each sample judged against the other three.
# python train_grpo.py config/grpo_small.py        (after config/sft_small.py)
out_dir = "out/grpo_small"
init_from = "out/sft_small"
reward_model = "out/rm_small"  # read only with reward='model'
reward = "task"
advantage = "grpo"
max_iters = 24
eval_interval = 24
# 16 prompts x 4 samples rather than 8 x 8 (the same 64 responses): the judge finds a template only among the
# prompts of one rollout, and with 8 prompts the policy learnt bodies that pass there but are templates over the
# held-out set. Tried for 24 iterations from an SFT model with the BPE tokenizer, 100 held-out prompts: template
# share of greedy completions 0.14 -> 0.48 at 8 x 8 (KL 2.1 nats), -> 0.33 at 16 x 4 (KL 1.7); solved with
# arguments 0.14 -> 0.10 and 0.12, while the rollouts' reward rose (0.23 -> 0.46 and 0.41): a body that passes
# within one rollout's prompts (`return self._closed()`) is a template across the held-out ones
batch_size = 16
group_size = 4
max_new_tokens = 96
temperature = 1.0
learning_rate = 1e-4
kl = "none"  # beta = 0, as trl's default: the reference is loaded only to measure the KL at evaluations
missing_eot_penalty = -1.0
device = "cpu"
