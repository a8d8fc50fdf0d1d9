# PPO on the small models: the SFT policy learns from the reward model's scores, under a KL penalty to the SFT
# model. About a minute per run on a 2-core CPU with bfloat16.
# python train_ppo.py config/ppo_small.py        (after config/sft_small.py and config/rm_small.py)
out_dir = "out/ppo_small"
init_from = "out/sft_small"
reward_model = "out/rm_small"
max_iters = 20
eval_interval = 20  # before and after
batch_size = 32
minibatch_size = 16
ppo_epochs = 2
max_new_tokens = 64  # as every stage
eval_samples = 4  # pass@4 and the KL to SFT at each evaluation
temperature = 0.7  # rollouts (and their log-probs) at 0.7: samples nearer the greedy completions we are judged on
learning_rate = 1e-4
kl_coef = 0.1  # beta: the reward model is a proxy, and the penalty keeps the policy where it can judge
score_norm = True
missing_eot_penalty = -1.0
device = "cpu"
