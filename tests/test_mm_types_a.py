"""Multimodal llama_types, part A: the CLIP-prefix text types (llama, llama_peft, mixtral,
mixtral_peft, mixtral_sparse with ``with_visual=True``) and llama_qformerv2(_peft).

Each type gets a tiny checkpoint in the original's key layout (``clip.*`` with the text tower,
``clip_proj``, ``clip_proj_norm``; or ``qformer.*``, ``qformer_proj.{0,1}``, ``start_img``,
``end_img``), config.json shrinking the encoder through ``clip_config`` / ``qformer_config``.

The reference re-states ORIGINAL-mm.md from the raw weights: the encoder module (our CLIP /
BLIP2, built here with the original's settings, QuickGELU for the OpenAI CLIP) gives the
features; the projection and LayerNorm, the tags, where the vectors go and the positions are
written out below; the text decoder is HF transformers' Llama / Mixtral on the same weights fed
``inputs_embeds``, one full forward per token.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from accessory.data.conversation import default_conversation
from accessory.data.system_prompt import format_prompt
from accessory.data.transform import get_transform
from accessory.errors import ConfigError
from accessory.model.layers.parallel import REPLICATED
from accessory.model.meta import MetaModel
from accessory.model.visual import BLIP2, CLIP, BLIP2Config, CLIPConfig
from accessory.quant import eligible_linears, resolve_scheme

import ckpt_utils
from ckpt_utils import LLAMA_SPM_VOCAB, TINY_LLAMA

transformers = pytest.importorskip("transformers")
import test_mixtral  # noqa: E402
from test_llama_hf_parity import hf_model  # noqa: E402

CLIP_TINY = dict(image_size=56, patch_size=14, width=32, layers=2, heads=2, embed_dim=24, vocab_size=50,
                 context_length=7, text_width=16, text_heads=2, text_layers=1)
QFORMER_TINY = dict(image_size=56, patch_size=14, vision_width=32, vision_layers=2, vision_heads=2, vision_mlp=64,
                    qformer_width=24, qformer_layers=2, qformer_heads=2, qformer_mlp=48, num_query_tokens=5)
SIZE = 56
CLIP_TYPES = ["llama", "llama_peft", "mixtral", "mixtral_peft", "mixtral_sparse"]
QFORMER_TYPES = ["llama_qformerv2", "llama_qformerv2_peft"]
MAX_SEQ_LEN = 96
PROMPT = "Describe the picture."
GEN = dict(max_gen_len=8, temperature=0.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(seed, n=1):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def perturbed(module_state, prefix, seed):
    """An encoder's freshly initialised state, every tensor nudged so norms and biases are not trivial."""
    gen = torch.Generator().manual_seed(seed)
    return {prefix + k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in module_state.items()}


def layer_norm_state(name, dim, gen):
    return {name + ".weight": 1.0 + 0.1 * torch.randn(dim, generator=gen),
            name + ".bias": 0.1 * torch.randn(dim, generator=gen)}


def tiny_clip():
    torch.manual_seed(11)
    return CLIP(CLIPConfig(**CLIP_TINY, quick_gelu=True, text_tower=True))  # the OpenAI build


def tiny_blip2():
    torch.manual_seed(12)
    return BLIP2(BLIP2Config(**QFORMER_TINY))


def visual_state(llama_type, dim, seed=3):
    gen = torch.Generator().manual_seed(seed)
    if llama_type in CLIP_TYPES:
        state = perturbed(tiny_clip().state_dict(), "clip.", seed)
        width = CLIP_TINY["embed_dim"]
        state["clip_proj.weight"] = torch.randn(dim, width, generator=gen) / math.sqrt(width)
        state["clip_proj.bias"] = 0.1 * torch.randn(dim, generator=gen)
        state.update(layer_norm_state("clip_proj_norm", dim, gen))
        return state
    state = perturbed(tiny_blip2().state_dict(), "qformer.", seed)
    width = QFORMER_TINY["qformer_width"]
    state["qformer_proj.0.weight"] = torch.randn(dim, width, generator=gen) / math.sqrt(width)
    state["qformer_proj.0.bias"] = 0.1 * torch.randn(dim, generator=gen)
    state.update(layer_norm_state("qformer_proj.1", dim, gen))
    state["start_img"] = torch.randn(1, 1, dim, generator=gen)
    state["end_img"] = torch.randn(1, 1, dim, generator=gen)
    return state


def text_config(llama_type):
    if llama_type.startswith("mixtral"):
        cfg = dict(test_mixtral.CFG)
    else:
        cfg = dict(TINY_LLAMA)
    if "peft" in llama_type:
        cfg.update(lora_rank=-1, bias_tuning=False)  # llama's / mixtral's keys: the plain HF reference applies
    return cfg


def text_state(llama_type, cfg):
    if llama_type.startswith("mixtral"):
        dense = test_mixtral.random_mixtral_state(test_mixtral.CFG, seed=7)
        return dense, (test_mixtral.dense_to_sparse(dense, test_mixtral.CFG) if llama_type == "mixtral_sparse"
                       else dense)
    state = ckpt_utils.random_llama_state(cfg, LLAMA_SPM_VOCAB, seed=5)
    return state, state


class Case:
    def __init__(self, llama_type, directory):
        self.llama_type = llama_type
        self.tagged = llama_type in QFORMER_TYPES
        self.cfg = text_config(llama_type)
        self.dense, stored = text_state(llama_type, self.cfg)
        self.visual = visual_state(llama_type, self.cfg["dim"])
        config = dict(self.cfg, **({"qformer_config": QFORMER_TINY} if self.tagged else {"clip_config": CLIP_TINY}))
        self.directory = ckpt_utils.write_checkpoint(directory, {**stored, **self.visual}, config, full_config=False,
                                                     llama_type=llama_type)
        self.model = MetaModel.from_pretrained(str(self.directory), with_visual=True, max_seq_len=MAX_SEQ_LEN,
                                               dtype=torch.float32, device="cpu", progress=False)
        if llama_type.startswith("mixtral"):
            self.reference = test_mixtral.hf_mixtral(self.dense, test_mixtral.CFG)
        else:
            self.reference = hf_model(self.dense, self.cfg, LLAMA_SPM_VOCAB, max_pos=2 * MAX_SEQ_LEN)

    # ---------------------------------------------------------------- the reference, from raw weights
    def image_vectors(self, image):
        """(N, dim) float64: every vector one image (3, S, S) inserts."""
        s = {k: v.double() for k, v in self.visual.items()}
        if self.tagged:
            encoder = tiny_blip2().double()
            encoder.load_state_dict({k[len("qformer."):]: v for k, v in s.items() if k.startswith("qformer.")})
            with torch.no_grad():
                feats = encoder.qformer_features(image[None].double())[0]          # (queries, 24)
            x = feats @ s["qformer_proj.0.weight"].T + s["qformer_proj.0.bias"]
            x = F.layer_norm(x, x.shape[-1:], s["qformer_proj.1.weight"], s["qformer_proj.1.bias"], 1e-5)
            return torch.cat([s["start_img"][0], x, s["end_img"][0]])
        encoder = tiny_clip().double()
        encoder.load_state_dict({k[len("clip."):]: v for k, v in s.items() if k.startswith("clip.")})
        with torch.no_grad():
            feats = encoder.encode_image(image[None].double(), project=True)[0]  # (257 at real size, 768)
        x = feats @ s["clip_proj.weight"].T + s["clip_proj.bias"]
        return F.layer_norm(x, x.shape[-1:], s["clip_proj_norm.weight"], s["clip_proj_norm.bias"], 1e-5)

    def sequence(self, ids, image):
        """tagged: [t0, start, V.., end, t1 ..]; prefix: [V.., t0, t1 ..] (positions 0 .. L-1 in order)."""
        text = self.dense["tok_embeddings.weight"][torch.tensor(ids)].double()
        vectors = self.image_vectors(image)
        parts = [text[:1], vectors, text[1:]] if self.tagged else [vectors, text]
        return torch.cat(parts).float()

    @torch.no_grad()
    def logits(self, ids, image):
        return self.reference(inputs_embeds=self.sequence(ids, image)[None]).logits[0]

    @torch.no_grad()
    def greedy(self, ids, image, n):
        embeds, out = self.sequence(ids, image), []
        for _ in range(n):
            token = int(self.reference(inputs_embeds=embeds[None]).logits[0, -1].argmax())
            if token == self.model.tokenizer.eos_id:
                break
            out.append(token)
            embeds = torch.cat([embeds, self.dense["tok_embeddings.weight"][token][None]])
        return out


@pytest.fixture(scope="module", params=CLIP_TYPES + QFORMER_TYPES)
def case(request, tmp_path_factory):
    return Case(request.param, tmp_path_factory.mktemp(request.param))


def expected_words(case):
    if case.tagged:
        return QFORMER_TINY["num_query_tokens"] + 2
    return (CLIP_TINY["image_size"] // CLIP_TINY["patch_size"]) ** 2 + 1


def test_image_words_is_the_inserted_count(case):
    model = case.model
    inserted = model.llma.encode_images(images(0)).shape[1]
    assert model.get_image_words() == inserted == expected_words(case) == case.image_vectors(images(0)[0]).shape[0]
    assert model.takes_images and model.image_size == SIZE


def test_logits_match_the_reference(case):
    texts = ["A red square", "Two cats sit on a mat."]
    pair = torch.cat([images(1), images(2)])
    got = case.model.compute_logits(texts, pair)
    n = case.model.get_image_words()
    for text, image, logits in zip(texts, pair, got):
        ids = case.model.tokenizer.encode(text, bos=True, eos=False)
        torch.testing.assert_close(logits, case.logits(ids, image)[n:], atol=1e-4, rtol=1e-4)
    # the original's training forward is text-aligned too (mixtral's returns (logits, losses))
    ids = case.model.tokenizer.encode(texts[0], bos=True, eos=False)
    with torch.inference_mode():
        out = case.model.llma(torch.tensor([ids]), pair[:1])
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out[0], case.logits(ids, pair[0])[n:], atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_the_reference(case):
    image = images(3)
    got = case.model.generate([PROMPT], image, return_logprobs=True, **GEN)[0]["tokens"]
    ids = case.model.tokenizer.encode(PROMPT, bos=True, eos=False)
    assert got == case.greedy(ids, image[0], GEN["max_gen_len"])
    assert len(got) >= 3


def test_answer_depends_on_the_image(case):
    model = case.model
    first = model.compute_logits([PROMPT], images(4))[0]
    second = model.compute_logits([PROMPT], images(5))[0]
    assert (first - second).abs().max() > 1e-2
    answers = {model.generate([PROMPT], images(seed), **GEN)[0] for seed in (4, 5, 6, 7)}
    assert len(answers) > 1


def test_seed_snippet_single_and_multi_turn(case):
    """The seed's multimodal usage: PIL image -> get_transform -> generate / stream_generate."""
    model = case.model
    pil = Image.fromarray((torch.rand(70, 90, 3, generator=torch.Generator().manual_seed(8)) * 255)
                          .to(torch.uint8).numpy())
    for transform in ("padded_resize", "resized_center_crop"):
        image = get_transform(transform, model.image_size)(pil).unsqueeze(0)
        prompt = format_prompt({"instruction": "What is in the image?"}, "alpaca")
        single = model.generate([prompt], image, max_gen_len=6, temperature=0.0)[0]
        ids = model.tokenizer.encode(prompt, bos=True, eos=False)
        assert single == model.tokenizer.decode(case.greedy(ids, image[0], 6))

        conv = default_conversation()
        conv.load_qas([["What is in the image?", single], ["And its colour?", None]])
        chunks = list(model.stream_generate(conv.get_prompt(), image[0], max_gen_len=6, temperature=0.0,
                                            additional_stop_symbols=[conv.response_end_signal]))
        assert chunks[-1]["end_of_content"]
        assert chunks[-1]["text"] == model.generate([conv.get_prompt()], image, max_gen_len=6, temperature=0.0,
                                                    additional_stop_symbols=[conv.response_end_signal])[0]


def test_forward_inference_with_the_image_first(case):
    model = case.model
    image = images(9)
    ids = model.tokenizer.encode(PROMPT, bos=True, eos=False)
    expected = model.generate([PROMPT], image, return_logprobs=True, **GEN)[0]["tokens"]
    got, out = [], model.llma.forward_inference(torch.tensor([ids]), 0, image)
    for step in range(GEN["max_gen_len"]):
        token = int(out[0].argmax())
        if token == model.tokenizer.eos_id:
            break
        got.append(token)
        out = model.llma.forward_inference(torch.tensor([[token]]), len(ids) + step, None)
    assert got == expected


def test_encoders_are_frozen_replicated_and_kept_out_of_quantization(case):
    model = case.model
    encoder, connectors = ("qformer", ["qformer_proj"]) if case.tagged else ("clip", ["clip_proj", "clip_proj_norm"])
    visual = [name for name, _ in model.llma.named_parameters()
              if name.split(".")[0] in [encoder] + connectors + ["start_img", "end_img"]]
    assert visual and all(model.split_plan.rule(name) is REPLICATED for name in visual)
    trainable = model.llma.get_trainable_params()
    assert not any(name.startswith(encoder + ".") for name in trainable)
    assert all(not p.requires_grad for name, p in model.llma.named_parameters() if name.startswith(encoder + "."))
    if "peft" not in case.llama_type:
        assert all(name in trainable for name in visual if not name.startswith(encoder + "."))
    assert model.get_quant_blocklist() == ["llma." + n for n in [encoder] + connectors]
    packed = eligible_linears(model, resolve_scheme("int8"), model.get_quant_blocklist())
    assert packed and not any(n.startswith(("llma." + encoder, "llma.qformer_proj", "llma.clip_proj")) for n in packed)
    assert any(".attention.wq" in n for n in packed)


def test_text_only_loading_is_unchanged(case):
    """with_visual=False builds no encoder; the checkpoint's visual entries are dropped with a warning."""
    with pytest.warns(UserWarning, match="dropped"):
        model = MetaModel.from_pretrained(str(case.directory), max_seq_len=MAX_SEQ_LEN, dtype=torch.float32,
                                          device="cpu", progress=False)
    assert not model.takes_images and model.get_image_words() == 0
    assert not any(k.startswith(("clip", "qformer", "start_img")) for k in model.llma.state_dict())
    ids = model.tokenizer.encode(PROMPT, bos=True, eos=False)
    with torch.no_grad():
        expected = case.reference(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(model.compute_logits([ids])[0], expected, atol=1e-4, rtol=1e-4)


def test_real_sizes_on_the_meta_device():
    """The default encoders are the original's: CLIP with its text tower 427,616,513 parameters,
    BLIP-2 without OPT 1,091,114,496; built on the meta device, nothing allocated."""
    from accessory.model.LLM import llama, llama_qformerv2
    with torch.device("meta"):
        clip_model = llama.Transformer(llama.ModelArgs(vocab_size=32000), with_visual=True)
        qformer_model = llama_qformerv2.Transformer(llama_qformerv2.ModelArgs(vocab_size=32000), with_visual=True)
    assert sum(p.numel() for p in clip_model.clip.parameters()) == 427_616_513
    assert clip_model.image_words == 257 and clip_model.image_size == 224
    assert clip_model.clip_proj.weight.shape == (4096, 768)
    assert "transformer.resblocks.11.mlp.c_proj.weight" in clip_model.clip.state_dict()
    assert sum(p.numel() for p in qformer_model.qformer.parameters()) == 1_091_114_496
    assert qformer_model.image_words == 34 and qformer_model.image_size == 224
    assert tuple(qformer_model.qformer_proj[0].weight.shape) == (4096, 768)


def test_bad_encoder_config_is_a_config_error(tmp_path):
    cfg = dict(TINY_LLAMA, clip_config={"widht": 32})
    directory = ckpt_utils.write_checkpoint(tmp_path, ckpt_utils.random_llama_state(TINY_LLAMA, LLAMA_SPM_VOCAB),
                                            cfg, full_config=False)
    with pytest.raises(ConfigError, match=r"clip_config .*unknown field\(s\) \['widht'\]"):
        MetaModel.from_pretrained(str(directory), with_visual=True, dtype=torch.float32, device="cpu", progress=False)
    cfg = dict(TINY_LLAMA, clip_config={"quick_gelu": False})
    (directory / "config.json").write_text(__import__("json").dumps(cfg))
    with pytest.raises(ConfigError, match="cannot set \\['quick_gelu'\\]"):
        MetaModel.from_pretrained(str(directory), with_visual=True, dtype=torch.float32, device="cpu", progress=False)


# --------------------------------------------------------------------------- llama_adapter with_visual
# The image changes the adapter prefix of its row and takes no sequence positions. The reference
# is test_llama_peft_adapter's float64 re-statement of the adapter with ``prefix + q`` as prefix.

ADAPTER_CFG = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-5, rope_theta=10000.0,
                   prefix_layers=1, prefix_len=4)
VISUAL_TINY = dict(v_embed_dim=32, v_depth=2, v_num_heads=2, v_mlp_ratio=2.0)


def tiny_adapter_clip():
    torch.manual_seed(13)
    return CLIP(CLIPConfig(**CLIP_TINY, quick_gelu=True, text_tower=False))  # the original deletes the text tower


def tiny_vit_blocks():
    from accessory.model.visual import ViTBlock
    torch.manual_seed(14)
    v = VISUAL_TINY
    return torch.nn.ModuleList(ViTBlock(v["v_embed_dim"], v["v_num_heads"], v["v_mlp_ratio"], qkv_bias=True)
                               for _ in range(v["v_depth"]))


class AdapterCase:
    def __init__(self, directory):
        import test_llama_peft_adapter as tpa
        self.tpa = tpa
        self.conf = tpa.full_config("llama_adapter", ADAPTER_CFG)
        self.text = tpa.random_state("llama_adapter", ADAPTER_CFG, seed=21)
        gen = torch.Generator().manual_seed(22)
        width, dim = VISUAL_TINY["v_embed_dim"], ADAPTER_CFG["dim"]
        visual = perturbed(tiny_adapter_clip().state_dict(), "clip.", 23)
        visual.update(perturbed(tiny_vit_blocks().state_dict(), "visual_blocks.", 24))
        visual["clip_proj.weight"] = torch.randn(width, CLIP_TINY["embed_dim"], generator=gen) / math.sqrt(width)
        visual["clip_proj.bias"] = 0.1 * torch.randn(width, generator=gen)
        visual.update(layer_norm_state("clip_proj_norm", width, gen))
        visual["visual_query"] = torch.randn(ADAPTER_CFG["prefix_len"], width, generator=gen)
        visual["visual_proj.weight"] = torch.randn(dim, width, generator=gen) / math.sqrt(width)
        visual["visual_proj.bias"] = 0.1 * torch.randn(dim, generator=gen)
        visual.update(layer_norm_state("visual_proj_norm", dim, gen))
        self.visual = visual
        config = dict(self.conf, clip_config=CLIP_TINY, visual_config=VISUAL_TINY)
        self.directory = ckpt_utils.write_checkpoint(directory, {**self.text, **visual}, config, full_config=False,
                                                     llama_type="llama_adapter")
        self.model = MetaModel.from_pretrained(str(self.directory), with_visual=True, max_seq_len=MAX_SEQ_LEN,
                                               dtype=torch.float32, device="cpu", progress=False)

    def queries(self, image):
        """(prefix_len, dim) float64: what the image adds to every adapted layer's prefix."""
        s = {k: v.double() for k, v in self.visual.items()}
        clip = tiny_adapter_clip().double()
        clip.load_state_dict({k[len("clip."):]: v for k, v in s.items() if k.startswith("clip.")})
        blocks = tiny_vit_blocks().double()
        blocks.load_state_dict({k[len("visual_blocks."):]: v for k, v in s.items() if k.startswith("visual_blocks.")})
        with torch.no_grad():
            feats = clip.encode_image(image[None].double(), project=True)[0]
            feats = feats @ s["clip_proj.weight"].T + s["clip_proj.bias"]
            feats = F.layer_norm(feats, feats.shape[-1:], s["clip_proj_norm.weight"], s["clip_proj_norm.bias"], 1e-5)
            x = torch.cat([s["visual_query"], feats])[None]
            for block in blocks:
                x = block(x)
        q = x[0, : ADAPTER_CFG["prefix_len"]] @ s["visual_proj.weight"].T + s["visual_proj.bias"]
        return F.layer_norm(q, q.shape[-1:], s["visual_proj_norm.weight"], s["visual_proj_norm.bias"], 1e-5)

    def state_with(self, image):
        state = dict(self.text)
        if image is not None:
            state["prefix"] = (self.text["prefix"].double() + self.queries(image)[None, None]).float()
        return state

    def logits(self, ids, image):
        return self.tpa.reference_logits(self.state_with(image), self.conf, ids).float()

    def greedy(self, ids, image, n):
        state, out, seq = self.state_with(image), [], list(ids)
        for _ in range(n):
            token = int(self.tpa.reference_logits(state, self.conf, seq, last_only=True)[-1].argmax())
            if token == self.model.tokenizer.eos_id:
                break
            out.append(token)
            seq.append(token)
        return out


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return AdapterCase(tmp_path_factory.mktemp("llama_adapter"))


def test_adapter_image_takes_no_positions(adapter):
    model = adapter.model
    assert model.takes_images and model.get_image_words() == 0 and model.image_size == SIZE
    assert model.llma.image_layout == "adapter"
    assert model.llma.encode_images(images(0)).shape == (1, ADAPTER_CFG["prefix_len"], ADAPTER_CFG["dim"])
    assert "clip.transformer.resblocks.0.attn.in_proj_weight" not in model.llma.state_dict()  # no text tower


def test_adapter_logits_match_the_reference(adapter):
    texts = ["A red square", "Two cats sit on a mat."]
    pair = torch.cat([images(1), images(2)])
    got = adapter.model.compute_logits(texts, pair)
    for text, image, logits in zip(texts, pair, got):
        ids = adapter.model.tokenizer.encode(text, bos=True, eos=False)
        assert logits.shape == (len(ids), LLAMA_SPM_VOCAB)
        torch.testing.assert_close(logits, adapter.logits(ids, image), atol=1e-4, rtol=1e-4)
    ids = adapter.model.tokenizer.encode(texts[1], bos=True, eos=False)
    with torch.inference_mode():
        out = adapter.model.llma(torch.tensor([ids]), pair[1:])
    torch.testing.assert_close(out[0], adapter.logits(ids, pair[1]), atol=1e-4, rtol=1e-4)
    # without an image: the learned prefix alone
    torch.testing.assert_close(adapter.model.compute_logits([ids])[0], adapter.logits(ids, None), atol=1e-4, rtol=1e-4)


def test_adapter_greedy_generation_matches_the_reference(adapter):
    image = images(3)
    got = adapter.model.generate([PROMPT], image, return_logprobs=True, max_gen_len=6, temperature=0.0)[0]["tokens"]
    ids = adapter.model.tokenizer.encode(PROMPT, bos=True, eos=False)
    assert got == adapter.greedy(ids, image[0], 6)
    assert len(got) >= 3


def test_adapter_answer_depends_on_the_image(adapter):
    model = adapter.model
    first = model.compute_logits([PROMPT], images(4))[0]
    second = model.compute_logits([PROMPT], images(5))[0]
    assert (first - second).abs().max() > 1e-2
    answers = {model.generate([PROMPT], images(seed), **GEN)[0] for seed in (4, 5, 6, 7)}
    assert len(answers) > 1


def test_adapter_batches_rows_with_and_without_images(adapter):
    """Per-row prefixes in one batch; rows leaving the batch keep the others' prefixes right."""
    model = adapter.model
    prompts = [PROMPT, "What colour is the large object on the left?", "Hello"]
    pair = torch.cat([images(5), images(6)])
    alone = [model.generate([p], pair[i:i + 1], **GEN)[0] for i, p in enumerate(prompts[:2])]
    assert model.generate(prompts[:2], pair, **GEN) == alone
    stop = [alone[0][:3]] if len(alone[0]) >= 3 else []
    short = model.generate(prompts[:2], pair, additional_stop_symbols=stop, **GEN)
    assert short[1] == model.generate([prompts[1]], pair[1:], additional_stop_symbols=stop, **GEN)[0]
    vectors = model.llma.encode_images(pair)
    ids = [model.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    from accessory.generation.sampling import SamplingParams
    states = None
    for states in model.engine.run(ids, [8, 8, 8], SamplingParams(), image_embeds=[vectors[0], None, vectors[1][None]]):
        pass
    with_first = model.generate([prompts[0]], pair[:1], max_gen_len=8, temperature=0.0, return_logprobs=True)
    without = model.generate([prompts[1]], max_gen_len=8, temperature=0.0, return_logprobs=True)
    with_second = model.generate([prompts[2]], pair[1:], max_gen_len=8, temperature=0.0, return_logprobs=True)
    assert [s.new_tokens for s in states] == [r[0]["tokens"] for r in (with_first, without, with_second)]


def test_adapter_forward_inference_with_the_image_first(adapter):
    model = adapter.model
    image = images(9)
    ids = model.tokenizer.encode(PROMPT, bos=True, eos=False)
    expected = model.generate([PROMPT], image, return_logprobs=True, **GEN)[0]["tokens"]
    got, out = [], model.llma.forward_inference(torch.tensor([ids]), 0, image)
    for step in range(GEN["max_gen_len"]):
        token = int(out[0].argmax())
        if token == model.tokenizer.eos_id:
            break
        got.append(token)
        out = model.llma.forward_inference(torch.tensor([[token]]), len(ids) + step, None)
    assert got == expected
    # a new sequence without an image goes back to the learned prefix
    text_only = model.llma.forward_inference(torch.tensor([ids]), 0, None)
    torch.testing.assert_close(text_only[0], adapter.logits(ids, None)[-1], atol=1e-4, rtol=1e-4)


def test_adapter_seed_snippet(adapter):
    model = adapter.model
    pil = Image.fromarray((torch.rand(64, 48, 3, generator=torch.Generator().manual_seed(10)) * 255)
                          .to(torch.uint8).numpy())
    for transform in ("padded_resize", "resized_center_crop"):
        image = get_transform(transform, model.image_size)(pil).unsqueeze(0)
        prompt = format_prompt({"instruction": "What is in the image?"}, "alpaca")
        single = model.generate([prompt], image, max_gen_len=5, temperature=0.0)[0]
        ids = model.tokenizer.encode(prompt, bos=True, eos=False)
        assert single == model.tokenizer.decode(adapter.greedy(ids, image[0], 5))
        conv = default_conversation()
        conv.load_qas([["What is in the image?", single], ["And its colour?", None]])
        chunks = list(model.stream_generate(conv.get_prompt(), image, max_gen_len=5, temperature=0.0))
        assert chunks[-1] == {"text": model.generate([conv.get_prompt()], image, max_gen_len=5, temperature=0.0)[0],
                              "end_of_content": True}


def test_adapter_visual_modules_frozen_replicated_and_full_precision(adapter):
    model = adapter.model
    visual = [n for n, _ in model.llma.named_parameters() if n.startswith(("clip", "visual_"))]
    assert visual and all(model.split_plan.rule(n) is REPLICATED for n in visual)
    assert all(not p.requires_grad for n, p in model.llma.named_parameters() if n.startswith("clip."))
    stage1 = model.llma.get_trainable_params()  # "sg": the visual branch is not trained
    assert not any(n.startswith(("clip", "visual_")) for n in stage1)
    packed = eligible_linears(model, resolve_scheme("int8"), model.get_quant_blocklist())
    assert packed and not any(n.startswith(("llma.clip", "llma.visual_")) for n in packed)
    assert {"llma.clip", "llma.visual_blocks", "llma.visual_proj"} <= set(model.get_quant_blocklist())


# --------------------------------------------------------------------------- dtype, --quant, shards

def test_bf16_int8_keeps_encoders_full_precision_and_runs(case):
    """--quant packs the text linears only; the encoder runs in the model dtype (bf16 here, where
    the original's float16 BLIP-2 / half-cast CLIP fails); answers stay close to float32's."""
    from accessory.quant.linear import QuantLinear
    model = MetaModel.from_pretrained(str(case.directory), with_visual=True, max_seq_len=MAX_SEQ_LEN,
                                      dtype=torch.bfloat16, device="cpu", quant="int8", progress=False)
    blocked = tuple(model.get_quant_blocklist())
    modules = dict(model.named_modules())
    assert any(isinstance(m, QuantLinear) for m in modules.values())
    assert not any(isinstance(m, QuantLinear) for n, m in modules.items() if n.startswith(blocked))
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n.startswith(blocked))
    image = images(3)
    got = model.compute_logits([PROMPT], image)[0]
    want = case.model.compute_logits([PROMPT], image)[0]
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.98
    assert model.generate([PROMPT], image, **GEN)[0]


def test_two_shard_checkpoint_holds_whole_encoders(case, tmp_path):
    """An mp=2 checkpoint (text weights cut as the original cuts them, encoders copied whole into
    both shards) merges into one process with the same image logits."""
    if case.llama_type.startswith("mixtral"):
        pytest.skip("mixtral's expert cuts are covered by test_mixtral; the encoders are the same code")
    state = dict(case.dense)
    config = __import__("json").loads((case.directory / "config.json").read_text())
    directory = ckpt_utils.write_checkpoint(tmp_path, {**state, **case.visual}, config, mp=2, full_config=False,
                                            llama_type=case.llama_type)
    model = MetaModel.from_pretrained(str(directory), with_visual=True, max_seq_len=MAX_SEQ_LEN,
                                      dtype=torch.float32, device="cpu", progress=False)
    image = images(4)
    torch.testing.assert_close(model.compute_logits([PROMPT], image)[0], case.model.compute_logits([PROMPT], image)[0],
                               atol=1e-5, rtol=1e-5)


def test_adapter_bf16_int8_keeps_the_visual_branch_full_precision(adapter):
    from accessory.quant.linear import QuantLinear
    model = MetaModel.from_pretrained(str(adapter.directory), with_visual=True, max_seq_len=MAX_SEQ_LEN,
                                      dtype=torch.bfloat16, device="cpu", quant="int8", progress=False)
    modules = dict(model.named_modules())
    assert any(isinstance(m, QuantLinear) for m in modules.values())
    assert not any(isinstance(m, QuantLinear) for n, m in modules.items() if n.startswith(("llma.clip", "llma.visual_")))
    image = images(3)
    got = model.compute_logits([PROMPT], image)[0]
    want = adapter.model.compute_logits([PROMPT], image)[0]
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.98


def test_encoder_config_fields_of_other_types_are_refused():
    from accessory.model.LLM import llama_adapter, llama_qformerv2
    small = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, vocab_size=100)
    with torch.device("meta"):
        with pytest.raises(ConfigError, match="llama_qformerv2 has no CLIP.*qformer_config"):
            llama_qformerv2.Transformer(llama_qformerv2.ModelArgs(**small, clip_config=CLIP_TINY), with_visual=True)
        with pytest.raises(ConfigError, match=r"qformer_config .*unknown field\(s\) \['vision_depth'\]"):
            llama_qformerv2.Transformer(llama_qformerv2.ModelArgs(**small, qformer_config={"vision_depth": 1}),
                                        with_visual=True)
        with pytest.raises(ConfigError, match=r"visual_config .*unknown field\(s\) \['depth'\].*v_depth"):
            llama_adapter.Transformer(llama_adapter.ModelArgs(**small, visual_config={"depth": 1}), with_visual=True)
        # without with_visual the encoder fields are not looked at
        llama_qformerv2.Transformer(llama_qformerv2.ModelArgs(**small, clip_config=CLIP_TINY))


def test_adapter_image_runs_and_the_prompt_cache(adapter):
    """The adapter's picture changes every position's keys (its prefix): an image run reuses
    neither a text run's cache nor another picture's, and the same picture's next turn reuses its
    own (all but the last token, prefilled again with the picture); each answers as a fresh run."""
    from accessory.generation.sampling import SamplingParams

    model = adapter.model
    ids = model.tokenizer.encode(PROMPT, bos=True, eos=False)
    vectors, other = model.llma.encode_images(images(3)), model.llma.encode_images(images(4))

    def run(prompt, image_embeds, n=6):
        states = None
        for states in model.engine.run([prompt], [n], SamplingParams(), logprobs=True, image_embeds=image_embeds):
            pass
        return states[0]
    fresh = {name: run(ids, embeds) for name, embeds in (("image", vectors), ("other", other), ("text", None))}
    model.engine.prompt_cache, model.engine.prompt_cache_slots = True, 3
    try:
        run(ids, None)
        with_image = run(ids, vectors)
        assert with_image.cached_tokens == 0
        assert with_image.new_tokens == fresh["image"].new_tokens == adapter.greedy(ids, images(3)[0], 6)
        again = run(ids, vectors)  # a regenerated answer: all but the last prompt token reused
        assert again.new_tokens == fresh["image"].new_tokens, (again.cached_tokens, again.new_tokens)
        assert again.cached_tokens == len(ids) - 1
        follow = ids + with_image.new_tokens + model.tokenizer.encode(" And then?", bos=False, eos=False)
        turn = run(follow, vectors)
        assert turn.cached_tokens == len(ids) + len(with_image.new_tokens) - 1
        model.engine.prompt_cache = False
        assert turn.new_tokens == run(follow, vectors).new_tokens
        model.engine.prompt_cache = True
        another = run(ids, other)
        assert another.cached_tokens == 0 and another.new_tokens == fresh["other"].new_tokens
        text = run(ids, None)
        assert text.cached_tokens == len(ids) and text.new_tokens == fresh["text"].new_tokens
    finally:
        model.engine.prompt_cache, model.engine.prompt_cache_slots = False, 1
        model.engine.clear_prompt_cache()
