"""
Sample from a trained model: any stage's out_dir, or GPT-2 weights.

    python sample.py --out_dir=out/lm_small --start="def "
    python sample.py --out_dir=out/sft_small --start=FILE:prompt.txt --greedy=True
    python sample.py --init_from=gpt2 --start="The meaning of life is" --top_p=0.9
    python sample.py --out_dir=out/sft_small --num_beams=4 --max_new_tokens=60
    python sample.py --out_dir=out/sft --chat=True     # type a prompt, read the response; empty line ends
Every key: python sample.py --help
"""
from dataclasses import dataclass

import torch

from common import (RunConfig, UserError, field, format_prompt, init_model, load_checkpoint, load_config, print_config,
                    setup_runtime)
from tokenizer import get_tokenizer


@dataclass
class Config(RunConfig):
    out_dir: str = "out/lm_small"  # the run to sample from (its ckpt.pt), unless init_from names GPT-2 weights
    init_from: str = "resume"  # 'resume' samples from out_dir; a GPT-2 name or Hugging Face directory loads those
    start: str = "\n"  # the prompt; FILE:path reads it from a file
    num_samples: int = field(3, min=1)  # samples to draw, one after another
    max_new_tokens: int = field(200, min=1)  # tokens to add at most (fewer if the context fills or end-of-text comes)
    temperature: float = field(0.8, min=0)  # < 1 sharpens the distribution, > 1 flattens it
    top_k: int = field(0, min=0)  # sample from the k most likely tokens only; 0 keeps all
    top_p: float = field(1.0, above=0, max=1)  # nucleus sampling: the fewest tokens holding this much probability
    greedy: bool = False  # always take the most likely token (deterministic)
    num_beams: int = field(1, min=1)  # beam search with this many beams (deterministic); 1 is off
    crop_prompt: bool = False  # keep only the end of a prompt longer than the context instead of stopping
    stop_at_eot: bool = True  # end a sample at the end-of-text token
    chat: bool = False  # a loop: each typed line is a prompt (in the checkpoint's template); prints the response


def main(argv=None):
    cfg = load_config(Config, argv)
    rt = setup_runtime(cfg)
    print_config(cfg)
    torch.manual_seed(cfg.seed)
    source = cfg.out_dir if cfg.init_from == "resume" else cfg.init_from
    model, _, tokenizer_spec = init_model(source, cfg.out_dir, {"dropout": 0.0}, None,
                                          stage_hint="train one first, e.g. `python train_lm.py config/lm_small.py`")
    model.eval().to(rt.device)
    tok = get_tokenizer(tokenizer_spec)
    if cfg.chat:
        return chat(model, tok, checkpoint_template(cfg), cfg, rt)

    start = cfg.start
    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        except OSError as e:
            raise UserError(f"cannot read the prompt file {start[5:]!r}: {e.strerror}") from None
    ids = tok.encode(start)
    if not ids:
        raise UserError("the prompt is empty; give --start some text")
    prompt = torch.tensor([ids], dtype=torch.long, device=rt.device)
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    outputs = []
    for i in range(cfg.num_samples):
        try:
            with rt.autocast:
                out = model.generate(prompt, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                                     top_p=cfg.top_p, greedy=cfg.greedy, num_beams=cfg.num_beams,
                                     eot_token=tok.eot_token if cfg.stop_at_eot else None,
                                     crop_prompt=cfg.crop_prompt, generator=generator)
        except ValueError as e:  # e.g. a prompt longer than the context
            raise UserError(str(e)) from None
        text = tok.decode(out[0].tolist())
        outputs.append(text)
        print(f"---------- sample {i + 1}/{cfg.num_samples}")
        print(text)
        if cfg.greedy or cfg.num_beams > 1:
            break  # deterministic: more samples would repeat this one
    return outputs


def checkpoint_template(cfg):
    """The prompt template the checkpoint was fine-tuned with (train_sft.py records it); 'none' otherwise."""
    if cfg.init_from != "resume":
        return "none"  # GPT-2 weights
    ckpt = load_checkpoint(cfg.out_dir)
    return ckpt.get("template") or ckpt.get("config", {}).get("template") or "none"


def chat(model, tok, template, cfg, rt):
    """Read a line, wrap it in the template, print the model's response up to end-of-text; repeat until an empty
    line or the end of input. A typed '\\n' stands for a newline (a code prompt needs several lines).
    Returns [(prompt, response)]."""
    print(f"chat (template {template!r}): type a prompt and press enter; an empty line or Ctrl-D ends")
    block_size = model.config.block_size
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    exchanges = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        prompt = format_prompt(line.replace("\\n", "\n"), template)
        ids = tok.encode(prompt)
        if len(ids) >= block_size and cfg.crop_prompt:
            ids = ids[-max(1, block_size - cfg.max_new_tokens):]  # keep the end, leave room for the response
        try:
            with rt.autocast:
                out = model.generate(torch.tensor([ids], device=rt.device), cfg.max_new_tokens,
                                     temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p,
                                     greedy=cfg.greedy, num_beams=cfg.num_beams, eot_token=tok.eot_token,
                                     generator=generator)
        except ValueError as e:  # a prompt longer than the context: say so and go on
            print(f"error: {e}")
            continue
        new = out[0, len(ids):].tolist()
        response = tok.decode(new[:new.index(tok.eot_token)] if tok.eot_token in new else new)
        print(response, flush=True)
        exchanges.append((prompt, response))
    return exchanges


if __name__ == "__main__":
    main()
