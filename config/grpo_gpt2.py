# The pycode recipe at GPU scale, step 4 with critic-free RL: GRPO on the task's judge (a verifiable reward).
# python train_grpo.py config/grpo_gpt2.py      (after config/sft_gpt2.py)
out_dir = "out/grpo_gpt2"
init_from = "out/sft_gpt2"
reward = "task"
prompts_file = "data/pycode/gpt2/prompts_train.jsonl"
eval_prompts = "data/pycode/gpt2/prompts_eval.jsonl"
advantage = "grpo"
batch_size = 32
group_size = 8
max_iters = 100
eval_interval = 25
max_new_tokens = 256
learning_rate = 1e-5
kl = "k3"
kl_coef = 0.04
device = "auto"
dtype = "auto"
