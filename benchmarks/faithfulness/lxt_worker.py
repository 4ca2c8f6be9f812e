"""LXT (AttnLRP / CP-LRP, ``lxt.efficient``) token relevance, run in a separate Python that has LXT.

LXT 2.1 patches transformers 4.x model files, so it lives in its own virtual environment
(transformers 4.52). ``run.py`` calls::

    <lxt python> lxt_worker.py REQUEST.pt RESULT.pt

REQUEST.pt (``torch.save`` of a dict):
    kind:      "bert-sentiment" or "llama"
    variant:   "attnlrp" or "cp-lrp" (llama only)
    folder:    bert: the all-MiniLM-L6-v2 folder (config.json, weights)
    head:      bert: state dict of the 384 x 2 sentiment head
    config:    llama: the LlamaConfig fields
    weights:   llama: path of a state dict file (the dequantised SmolLM2 of the main environment)
    examples:  list of (input_ids (1, L) long tensor, target int)

RESULT.pt: ``{"relevance": [(L,) float tensors], "logits": [target logit per example], "versions": str}``.

Relevance follows LXT's recipe: patch the model module with ``lxt.efficient.monkey_patch``,
run the model on the word embeddings with ``requires_grad``, backpropagate the target logit,
and take ``(embeddings * grad).sum(-1)``. The MiniLM classifier's pooling is the mean over the
tokens and the L2 normalisation's norm is detached (LXT treats normalisers as constants, as its
layer-norm patch does).
"""

from __future__ import annotations

import sys

import torch


def bert_sentiment(request: dict) -> dict:
    from lxt.efficient import monkey_patch
    from transformers import AutoModel
    from transformers.models.bert import modeling_bert

    monkey_patch(modeling_bert)
    encoder = AutoModel.from_pretrained(request["folder"], attn_implementation="eager").eval()
    head = torch.nn.Linear(encoder.config.hidden_size, 2)
    head.load_state_dict(request["head"])
    head.eval()
    for p in list(encoder.parameters()) + list(head.parameters()):
        p.requires_grad_(False)
    relevance, logits = [], []
    for ids, target in request["examples"]:
        mask = torch.ones_like(ids)
        embeddings = encoder.get_input_embeddings()(ids).detach().requires_grad_(True)
        states = encoder(inputs_embeds=embeddings, attention_mask=mask).last_hidden_state
        pooled = states.mean(1)
        normalised = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12).detach()
        out = head(normalised)
        out[0, target].backward()
        relevance.append((embeddings * embeddings.grad).sum(-1)[0].detach())
        logits.append(float(out[0, target]))
    return {"relevance": relevance, "logits": logits}


def llama(request: dict) -> dict:
    import lxt.efficient.models.llama as lxt_llama
    from lxt.efficient import monkey_patch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    patch_map = lxt_llama.cp_LRP if request.get("variant") == "cp-lrp" else lxt_llama.attnLRP
    monkey_patch(modeling_llama, patch_map)
    config = LlamaConfig(**request["config"])
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    state = torch.load(request["weights"], map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    relevance, logits = [], []
    for ids, target in request["examples"]:
        embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeddings, use_cache=False).logits[0, -1]
        out[target].backward()
        relevance.append((embeddings * embeddings.grad).sum(-1)[0].detach())
        logits.append(float(out[target]))
    return {"relevance": relevance, "logits": logits}


def main() -> None:
    request_path, result_path = sys.argv[1], sys.argv[2]
    request = torch.load(request_path, map_location="cpu", weights_only=False)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, int(request.get("threads", torch.get_num_threads()))))
    kind = request["kind"]
    if kind == "bert-sentiment":
        result = bert_sentiment(request)
    elif kind == "llama":
        result = llama(request)
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    import lxt
    import transformers

    result["versions"] = (
        f"lxt {getattr(lxt, '__version__', '2.x')}, transformers {transformers.__version__}, torch {torch.__version__}"
    )
    torch.save(result, result_path)


if __name__ == "__main__":
    main()
