# PPO on the small models: the SFT policy learns from the reward model's scores, under a KL penalty.
# About 4 minutes on a 2-core laptop CPU.
# python train_ppo.py config/ppo_small.py        (after config/sft_small.py and config/rm_small.py)
out_dir = "out/ppo_small"
init_from = "out/sft_small"
reward_model = "out/rm_small"
max_iters = 40
eval_interval = 20  # each evaluation: greedy + sampled completions of the 220 held-out prompts, about 20 s
batch_size = 32
minibatch_size = 16
ppo_epochs = 2
max_new_tokens = 96
temperature = 0.7  # rollouts (and their log-probs) at 0.7: samples nearer the greedy completions we are judged on
learning_rate = 1e-4
kl_coef = 0.05
score_norm = True
missing_eot_penalty = -1.0
device = "cpu"
# measured from the same SFT model and reward model (parses on 220 held-out prompts, SFT 0.832; 40 iterations):
# kl 0.05 at temperature 1.0: 0.877 at iteration 20, 0.864 at 40; kl 0.1: 0.964, 0.964 (1 degenerate);
# this config: 0.959, 0.959 (none degenerate). kl 0.05 with lr 2e-4, or kl 0.02 with 4 epochs: the reward
# model's blind spots win (parses 0.40 and 0.09 while its score climbs): reward over-optimisation.
