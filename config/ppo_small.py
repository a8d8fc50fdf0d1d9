# PPO on the small models: the SFT policy learns from the reward model's scores, under a KL penalty.
# python train_ppo.py config/ppo_small.py        (after config/sft_small.py and config/rm_small.py)
out_dir = "out/ppo_small"
init_from = "out/sft_small"
reward_model = "out/rm_small"
max_iters = 60
eval_interval = 20
batch_size = 32
minibatch_size = 16
ppo_epochs = 4
max_new_tokens = 96
learning_rate = 1e-4
kl_coef = 0.02
score_norm = True
missing_eot_penalty = -1.0
device = "cpu"
