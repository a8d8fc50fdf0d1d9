# The IMDB recipe, step 1: GPT-2 (124M) fine-tuned on IMDB reviews (trl starts from such a model, lvwerra/gpt2-imdb).
# For one GPU of 24-80 GB, bf16 autocast and torch.compile; torchrun spreads it over several.
# python data/imdb/prepare.py && python train_lm.py config/lm_imdb_gpt2.py
out_dir = "out/lm_imdb_gpt2"
init_from = "gpt2"  # OpenAI's weights (downloaded once), or a local Hugging Face directory
dataset = "imdb"  # train.bin: the 75,000 train reviews, labelled and not (~300 tokens each); val.bin: the test ones
block_size = 1024  # GPT-2's own context: the reward model and PPO read whole reviews
dropout = 0.1
batch_size = 8
gradient_accumulation_steps = 4  # 8 x 4 x 1024 = 32,768 tokens per step (divided among the processes)
max_iters = 700  # 23M tokens: about one epoch (at ~300 tokens a review)
eval_interval = 100
eval_iters = 40
log_interval = 10
learning_rate = 5e-5  # fine-tuning: the weights should learn the reviews' style, not forget English
min_lr = 5e-6
warmup_iters = 50
weight_decay = 0.1
compile = True
device = "auto"
dtype = "auto"  # bfloat16 where the GPU has it, else float16 with a loss scaler
peak_tflops = 312.0  # A100 bf16 dense; set your GPU's (H100 SXM: 989, A10G: 125, RTX 4090: 165) for a true MFU
