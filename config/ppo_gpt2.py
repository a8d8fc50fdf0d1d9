# The pycode recipe at GPU scale, step 4: PPO of the SFT model against the reward model, with a KL penalty.
# python train_ppo.py config/ppo_gpt2.py      (after config/sft_gpt2.py and config/rm_gpt2.py)
out_dir = "out/ppo_gpt2"
init_from = "out/sft_gpt2"
reward_model = "out/rm_gpt2"
prompts_file = "data/pycode/gpt2/prompts_train.jsonl"
eval_prompts = "data/pycode/gpt2/prompts_eval.jsonl"
max_iters = 100
eval_interval = 25
batch_size = 64
minibatch_size = 16
ppo_epochs = 2
max_new_tokens = 256
temperature = 0.7
learning_rate = 1e-5
kl_coef = 0.1
device = "auto"
dtype = "auto"  # PPO runs eagerly: generation's KV cache grows every step, which torch.compile would re-trace
