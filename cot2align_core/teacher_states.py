"""The teacher's side of distillation, computed once: hidden states at the response positions.

For each tokenized example (prompt + response, ``prompt_tokens`` long prompt) the teacher runs
once; the positions that matter are the *prediction positions* p whose next token is a response
token (``prompt_tokens - 1 .. n_tokens - 2``): a causal LM's state at p predicts token p + 1.
What is kept there: the hidden states of the chosen layers (HF ``hidden_states`` indices; -1 is
the last, after the final norm), the input token at p and the target token p + 1 (the response
token, EOS included), and optionally the top-k logits.
"""
from __future__ import annotations

import torch


def prediction_positions(n_tokens: int, prompt_tokens: int) -> torch.Tensor:
    """Positions whose next token is a response token: prompt_tokens-1 .. n_tokens-2."""
    return torch.arange(max(prompt_tokens - 1, 0), n_tokens - 1)


@torch.no_grad()
def teacher_rows(model, rows: list[dict], *, layers: list[int], dtype: torch.dtype, topk: int,
                 pad_id: int, device: str, batch_size: int):
    """Yield (row, hidden [L, R, D], positions, input_ids, target_ids, topk_ids, topk_logits)."""
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)  # copies Arrow's read-only buffer
            att[i, :n] = 1
        out = model(input_ids=ids.to(device), attention_mask=att.to(device),
                    output_hidden_states=True)
        states = torch.stack([out.hidden_states[layer] for layer in layers], dim=1)  # [B,L,T,D]
        for i, r in enumerate(batch):
            pos = prediction_positions(len(r["input_ids"]), int(r["prompt_tokens"]))
            hidden = states[i][:, pos.to(device)].to(dtype).cpu().contiguous()
            tk_ids = tk_logits = None
            if topk:
                k = min(topk, out.logits.shape[-1])
                vals, idx = out.logits[i, pos.to(device)].float().topk(k, dim=-1)
                tk_ids, tk_logits = idx.to(torch.int32).cpu(), vals.cpu()
            yield (r, hidden, pos, ids[i, pos], ids[i, pos + 1], tk_ids, tk_logits)
