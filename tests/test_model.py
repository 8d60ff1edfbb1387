"""Stage-split models: equal to the unsplit transformers model; deterministic, independent per-stage init."""
import json
import subprocess

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from swarm_peer.config import load_config
from swarm_peer.model import StageModel, build_stage, hf_config, stage_layer_ranges, weights_hash
from tests.conftest import PYTHON, ROOT

SMALL = ["model.hidden_size=64", "model.num_heads=4", "model.num_layers=4", "model.max_position_embeddings=64",
         "data.seq_len=32"]


def _cfg(family, stages, extra=()):
    over = [*SMALL, f"model.family={family}", f"swarm.num_stages={stages}", *extra]
    if family == "llama":
        over.append("model.num_kv_heads=2")
    return load_config(None, over)


def _hf_model_from_stages(cfg, stages):
    """The real transformers model (GPT2LMHeadModel / LlamaForCausalLM) holding the stages' weights."""
    hf = hf_config(cfg.model)
    full = GPT2LMHeadModel(hf) if hf.model_type == "gpt2" else LlamaForCausalLM(hf)
    body = full.transformer if hf.model_type == "gpt2" else full.model
    blocks = body.h if hf.model_type == "gpt2" else body.layers
    with torch.no_grad():
        for st in stages:
            if st.is_first:
                (body.wte if hf.model_type == "gpt2" else body.embed_tokens).load_state_dict(st.embed_tokens.state_dict())
                if hf.model_type == "gpt2":
                    body.wpe.load_state_dict(st.embed_positions.state_dict())
            for i, block in enumerate(st.blocks):
                blocks[st.start + i].load_state_dict(block.state_dict())
            if st.is_last:
                (body.ln_f if hf.model_type == "gpt2" else body.norm).load_state_dict(st.norm.state_dict())
                full.lm_head.load_state_dict(st.lm_head.state_dict())
    return full, body, blocks


def _hf_param(full, body, blocks, st, name):
    """The transformers parameter matching stage parameter `name`."""
    gpt2 = full.config.model_type == "gpt2"
    head, _, rest = name.partition(".")
    if head == "blocks":
        idx, _, rest = rest.partition(".")
        return blocks[st.start + int(idx)].get_parameter(rest)
    table = {"embed_tokens": body.wte if gpt2 else body.embed_tokens, "embed_positions": getattr(body, "wpe", None),
             "norm": body.ln_f if gpt2 else body.norm, "lm_head": full.lm_head}
    return table[head].get_parameter(rest)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
def test_stages_in_sequence_equal_unsplit_transformers_model(family, num_stages):
    cfg = _cfg(family, num_stages)
    stages = [build_stage(cfg, i) for i in range(num_stages)]
    full, body, blocks = _hf_model_from_stages(cfg, stages)
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(0, cfg.model.vocab_size, (3, cfg.data.seq_len + 1), generator=gen)
    inputs, labels = seq[:, :-1], seq[:, 1:]

    x = inputs
    for st in stages:
        x = st(x)
    loss = StageModel.loss(x, labels)
    loss.backward()

    ref_logits = full(input_ids=inputs).logits
    ref_loss = torch.nn.functional.cross_entropy(ref_logits.reshape(-1, ref_logits.shape[-1]), labels.reshape(-1))
    ref_loss.backward()

    torch.testing.assert_close(x, ref_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    checked = 0
    for st in stages:
        for name, p in st.named_parameters():
            ref = _hf_param(full, body, blocks, st, name)
            torch.testing.assert_close(p.grad, ref.grad, atol=1e-5, rtol=0, msg=f"stage {st.start}: {name}")
            checked += 1
    assert checked == sum(1 for _ in full.parameters())  # every transformers parameter has its stage twin


def test_balanced_boundaries_and_explicit_boundaries():
    cfg = load_config(None, ["model.num_layers=12", "swarm.num_stages=4"])
    ranges = stage_layer_ranges(cfg)
    assert ranges[0][0] == 0 and ranges[-1][1] == 12 and all(b > a for a, b in ranges)
    assert all(r1[1] == r2[0] for r1, r2 in zip(ranges, ranges[1:]))
    # embeddings and head weigh on the end stages, so they get no more blocks than the middle ones
    sizes = [b - a for a, b in ranges]
    assert sizes[0] <= max(sizes[1:-1]) and sizes[-1] <= max(sizes[1:-1])
    explicit = load_config(None, ["model.num_layers=12", "swarm.num_stages=3", "swarm.stage_boundaries=[2,9]"])
    assert stage_layer_ranges(explicit) == [(0, 2), (2, 9), (9, 12)]


def test_block_weights_do_not_depend_on_boundaries():
    a = build_stage(_cfg("gpt2", 2, ["swarm.stage_boundaries=[1]"]), 1)  # blocks 1..3
    b = build_stage(_cfg("gpt2", 2, ["swarm.stage_boundaries=[2]"]), 1)  # blocks 2..3
    assert torch.equal(a.blocks[1].attn.c_attn.weight, b.blocks[0].attn.c_attn.weight)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    whole = build_stage(_cfg("gpt2", 2), None)
    assert torch.equal(whole.blocks[3].mlp.c_fc.weight, a.blocks[2].mlp.c_fc.weight)
    other_seed = build_stage(_cfg("gpt2", 2, ["run.seed=1"]), 1)
    assert not torch.equal(other_seed.lm_head.weight, a.lm_head.weight)


_BUILD = """
import sys, json, torch
from swarm_peer.config import load_config
from swarm_peer.model import build_stage, weights_hash
over, order = json.loads(sys.argv[1]), json.loads(sys.argv[2])
torch.manual_seed(int(sys.argv[3]))   # the global RNG state must not matter
torch.randn(int(sys.argv[3]) + 1)
cfg = load_config(None, over)
print(json.dumps({s: weights_hash(build_stage(cfg, s)) for s in order}))
"""


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_independent_builds_are_bit_identical_across_processes(family):
    over = [*SMALL, f"model.family={family}", "swarm.num_stages=3"]

    def run(order, noise):
        out = subprocess.run([PYTHON, "-c", _BUILD, json.dumps(over), json.dumps(order), str(noise)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120, check=True)
        return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}

    all_in_order = run([0, 1, 2], 3)
    only_two = run([2], 7)  # stage 2 built alone, in another process with another RNG history
    reversed_order = run([2, 1, 0], 11)
    assert only_two[2] == all_in_order[2] == reversed_order[2]
    assert all_in_order == reversed_order
    assert len(set(all_in_order.values())) == 3


def test_weights_hash_sees_any_change():
    st = build_stage(_cfg("gpt2", 2), 0)
    h = weights_hash(st)
    with torch.no_grad():
        st.blocks[0].ln_1.bias[0] += 1e-7
    assert weights_hash(st) != h


def test_pretrained_directory_loads_and_unties(tmp_path):
    cfg = _cfg("gpt2", 2)
    hf = hf_config(cfg.model)
    hf.tie_word_embeddings = True
    src = GPT2LMHeadModel(hf)
    src.save_pretrained(tmp_path)
    pcfg = load_config(None, [*SMALL, f"model.name_or_path={tmp_path}", "swarm.num_stages=2"])
    s0, s1 = build_stage(pcfg, 0), build_stage(pcfg, 1)
    torch.testing.assert_close(s0.embed_tokens.weight, src.transformer.wte.weight)
    torch.testing.assert_close(s1.lm_head.weight, src.lm_head.weight)
    assert s1.lm_head.weight.data_ptr() != s0.embed_tokens.weight.data_ptr()
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    torch.testing.assert_close(s1(s0(x)), src(input_ids=x).logits, atol=1e-5, rtol=0)
