"""Two exact shortcuts for training a plain causal LM: the loss without the full logits tensor, and no attention
mask for right-padded rows.

Fused loss: the LM head and cross-entropy computed in chunks of tokens.

A Hugging Face causal LM computes logits for every position (batch x length x vocabulary, 49,152 wide for
SmolLM2), upcasts them to fp32 and runs log-softmax forward and backward over all of them. On a 2-core CPU that
memory traffic, not the matrix products, is about a third of a training step (measured with torch.profiler on
SmolLM2-135M, 8 rows of ~240 tokens). Here the head runs on the positions that carry a label only, a chunk at a
time, and the gradient with respect to the hidden states (and the head's weight, when it trains) is formed in
the same pass, so no chunk's logits outlive its loop iteration. This is the chunked "fused linear cross-entropy"
of Liger-Kernel and torchtune, written in plain PyTorch. The loss is the same sum the model's own loss uses; the
products run in the autocast dtype exactly as `lm_head` would, and the softmax in fp32 as the model's loss does.

No mask: in a right-padded batch every real token sits before its row's padding, so causal attention alone
keeps it from attending to padding, and the attention mask changes nothing for the positions that carry labels.
Without it, transformers calls scaled_dot_product_attention with is_causal=True, whose kernels skip the masked
upper triangle instead of computing it and masking it (measured on 2 CPU cores, SmolLM2-135M, 8 rows padded to
710: a step 27% faster). Padding positions then compute garbage that no label reads.

Only architectures whose logits are exactly `lm_head(final hidden state)` and whose attention is plain causal
take these paths (no logit scaling or soft-capping); others keep the model's own forward and loss.
"""

from __future__ import annotations

import torch

# model_type values whose forward is `logits = lm_head(norm(h))` and whose loss is plain shifted cross-entropy
# gemma3_text: Gemma 3's head is plain (its soft-capping is off by default; the check below catches it when on)
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "gemma3_text"})


def is_plain_causal_lm(model) -> bool:
    """True when `model` (a causal LM, possibly inside a peft wrapper) is a plain causal decoder computing logits
    as a bias-free linear head on the last hidden state, so both shortcuts give its loss exactly."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    # a LoRA-wrapped head is not an nn.Linear; its adapter must run, so it keeps the model's own loss
    return (
        getattr(config, "model_type", None) in PLAIN_HEAD_TYPES
        and type(head) is torch.nn.Linear
        and head.bias is None
        and not getattr(config, "final_logit_softcapping", None)
    )


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(hidden @ weight.T, targets). The backward pass only scales gradients that
    the forward pass already formed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        kind = hidden.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].to(dtype)
            y = targets[start:start + chunk]
            logits = torch.mm(h, w.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                # d(sum CE)/d(logits) = softmax - one_hot, built in place over this chunk's logits
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(len(y), device=g.device), y] -= 1.0
                g = g.to(dtype)
                if need_h:
                    grad_h[start:start + chunk] = torch.mm(g, w)
                if need_w:
                    grad_w += torch.mm(g.t(), h).float()
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None,
            grad_w * grad_out if grad_w is not None else None,
            None,
            None,
        )


def is_right_padded(attention_mask) -> bool:
    """True when every row of a 0/1 mask is ones then zeros (padding on the right only)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return False
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all() and attention_mask[:, 0].all())


def linear_cross_entropy(hidden, weight, targets, chunk: int = 1024):
    """sum_i CE(hidden[i] @ weight.T, targets[i]) for 2-D `hidden` (rows x width) and 1-D `targets`."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0  # keeps the graph (and DDP) intact on a label-free batch
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)


def causal_lm_loss_sum(model, input_ids, attention_mask, labels, chunk: int = 1024, ref_logprobs=None):
    """(sum of the shifted next-token cross-entropy over labelled positions, number of such positions), computed
    through `model`'s own forward (so DDP and peft hooks run) with the head applied by `linear_cross_entropy`.
    With `ref_logprobs`, the sum also holds `excess_logprob_sum` over the positions they mark."""
    # logits_to_keep=1 makes the model's own head run on one position only; hidden_states[-1] is the final-norm
    # output (transformers ties it to last_hidden_state)
    out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    inner = model.module if hasattr(model, "module") else model  # DDP
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    weight = inner.get_output_embeddings().weight
    total = linear_cross_entropy(hidden[keep], weight, targets[keep], chunk)
    if ref_logprobs is not None:
        marked, tokens, ref = marked_positions(input_ids, ref_logprobs)
        logits = torch.nn.functional.linear(hidden[marked], weight)  # the marked positions only: a few per row
        total = total + excess_logprob_sum(logits, tokens, ref)
    return total, keep.sum()


def logits_loss_sum(logits, labels):
    """(summed shifted cross-entropy over labelled positions, their number) from a model's full logits: the path of
    a model the chunked head cannot take."""
    targets = labels[:, 1:]
    total = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                              ignore_index=-100, reduction="sum")
    return total, (targets != -100).sum()


def excess_logprob_sum(logits, tokens, ref):
    """sum_i max(0, log_softmax(logits[i])[tokens[i]] - ref[i]): how many nats a model puts each token above a
    reference log-probability (find-and-unlearn's `match_base`: the base model's, so this is the likelihood gap
    its discovery measures). Its gradient does not fade as the token's probability falls, as cross-entropy's
    pull towards another token does, and it stops once the token is no likelier than the reference says."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    logp = torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None]).squeeze(1)
    return (logp - ref.float()).clamp(min=0).sum()


def marked_positions(input_ids, ref_logprobs):
    """(mask over the shifted positions, their tokens, their references) for the tokens `ref_logprobs` marks (not
    NaN): position j's logits predict token j + 1, as in the shifted loss."""
    marked = ~ref_logprobs[:, 1:].isnan()
    return marked, input_ids[:, 1:][marked], ref_logprobs[:, 1:][marked]


def marked_excess_sum(logits, input_ids, ref_logprobs):
    """`excess_logprob_sum` over the marked positions of full (batch x length x vocabulary) logits."""
    marked, tokens, ref = marked_positions(input_ids, ref_logprobs)
    return excess_logprob_sum(logits[:, :-1][marked], tokens, ref)
