"""The plain transformers training loop timed against our trainer on an H200 (docs/benchmarks.md, GPU).

    python docs/gpu/hf_loop.py sdpa      # or eager; needs a CUDA GPU

GPT2LMHeadModel at GPT-2 124M's sizes (vocabulary padded to 50304 like ours, no dropout), bf16 autocast,
loss.backward(), clip_grad_norm_(1.0), AdamW(fused=True).step(), zero_grad(); 8 x 1024 random tokens;
40 iterations, the median of the last 30. Kept as it ran (the output is docs/gpu/logs/m4_after_vs_transformers.log).
"""
import sys, time, torch
from transformers import GPT2Config, GPT2LMHeadModel
attn = sys.argv[1] if len(sys.argv) > 1 else "sdpa"
torch.manual_seed(0)
cfg = GPT2Config(vocab_size=50304, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attn)
model = GPT2LMHeadModel(cfg).cuda().train()
assert model.config._attn_implementation == attn, model.config._attn_implementation
opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.01, fused=True)
x = torch.randint(0, 50257, (8, 1024), device="cuda")
times = []
for it in range(40):
    torch.cuda.synchronize(); t = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss  # HF shifts the labels itself
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(); times.append(time.perf_counter() - t)
ms = sorted(times[10:])[len(times[10:]) // 2] * 1e3
flops = 6 * sum(p.numel() for p in model.parameters()) * 8192 + 12 * 12 * 8 * 1024 * 1024 * 768  # rough
print(f"hf-{attn} bf16 autocast, fused AdamW: median {ms:.1f} ms/iter, {8192 / ms * 1e3:.0f} tokens/s, ~{flops / ms / 1e9:.0f} TFLOP/s (6N+attn rough)")
