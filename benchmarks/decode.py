"""Decode and prefill speed of Accessory's engine against HF transformers and llama.cpp on the same random weights.

    python benchmarks/decode.py [--shapes XS S] [--peers hf llama.cpp] [--gguf-types f16 q8_0 q4_0]
                                [--threads 2] [--new-tokens 32] [--repeats 3] [--small-pages]
                                [--context 1024]

Shapes: XS (dim 768, 12 layers, 12 heads, FFN 2048, vocab 32000) and S (TinyLlama-1.1B: dim 2048,
22 layers, 32 heads, 4 KV heads, FFN 5632), random weights; and ``smollm2``, the real weights of the
embedded demo model (SmolLM2-135M-Instruct: dim 576, 30 layers, 9 heads, 3 KV heads, FFN 1536,
vocab 49152, tied embeddings; converted from its GGUF by ``ensure_demo_model`` on first use, its
GGUF exports written to --workdir/smollm2). The default runs XS only (minutes on 2 quiet cores); S with
every peer takes far longer (each engine runs its 16-stream prompts and decodes 4 times): --shapes XS S.
Ours and HF run in bf16. Every engine of a shape is loaded at once and measured in interleaved rounds
(one sample of each per round; rates are medians over the --repeats rounds):
  decode  = tokens/s of one stream after the prompt (time(N+1 tokens) - time(1 token)) / N
  prefill = prompt tokens/s for a 128-token prompt
  batch16 = aggregate new tokens/s of 16 streams decoding together
  ctxC    = (with --context C) tokens/s of one stream decoding after a C-token prompt, timed from its
            first new token to its last (the prompt's prefill, minutes for HF at long C, left out):
            each step then also reads C positions of keys and values per layer
Every engine decodes greedily and generates exactly the tokens asked for (no stop token).

llama.cpp (when llama-cpp-python is installed: pip install llama-cpp-python, or the `bench` extra) runs the
same weights exported with ``accessory convert --to gguf`` (accessory/checkpoint/gguf_export.py) to each
--gguf-types file, through llama.cpp's C API (llama_decode with a llama_batch; 16 streams are 16 sequence
ids in one batch), with llama.cpp's default context settings, n_threads = --threads. F16 is compared with
our bf16; Q8_0 with our int8 and Q4_0 with our int4 (MetaModel quant=; Q4_0 keeps the output head Q8_0
as our int4 keeps it 8-bit). Prints tables with accessory / HF and accessory / llama.cpp ratios.
The GGUF files are written once next to the random checkpoint in --workdir and reused by later runs.
--small-pages adds ours bf16 with ACCESSORY_HUGE_PAGES=0 (weights and KV cache in 4 KiB pages) to the
same rounds, and its ratio.
Measure on a quiet machine: with other jobs on the cores every engine's numbers swing by 2x or more.
"""

import argparse
import importlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accessory.checkpoint.demo_model import ensure_demo_model  # noqa: E402
from accessory.checkpoint.gguf_export import export_gguf  # noqa: E402
from accessory.generation.engine import GenerationEngine  # noqa: E402
from accessory.generation.sampling import SamplingParams  # noqa: E402
from accessory.model.LLM.llama import ModelArgs, Transformer, ffn_hidden_dim  # noqa: E402
from accessory.model.layers.panel_linear import PanelLinear  # noqa: E402
from accessory.model.meta import MetaModel  # noqa: E402

SHAPES = {
    "XS": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, multiple_of=2048, norm_eps=1e-5),
    "S": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, multiple_of=256, norm_eps=1e-5),
}
REAL = {"smollm2": ensure_demo_model}  # shapes measured on real weights: name -> its checkpoint directory
VOCAB = 32000  # (random prompt ids stay below it: every model here has at least this many)
GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_0")
#: our weights each GGUF type is compared with
OURS_FOR_GGUF = {"f16": "bf16", "bf16": "bf16", "q8_0": "int8", "q4_0": "int4"}
METRICS = ("decode", "prefill", "batch16")
TOKENIZER = Path(os.environ.get("ACCESSORY_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "fixtures" / \
    "tokenizers" / "llama-spm"


def build_checkpoint(shape: str, root: Path) -> Path:
    cfg = SHAPES[shape]
    directory = root / shape
    if (directory / "consolidated.00-of-01.model.pth").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(ModelArgs(**cfg, vocab_size=VOCAB)).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, s in shapes.items():
        value = 1 + 0.1 * torch.randn(s, generator=gen) if key.endswith("norm.weight") else \
            torch.randn(s, generator=gen) / (s[1] ** 0.5 if key != "tok_embeddings.weight" else 1)
        state["llma." + key] = value.to(torch.bfloat16)
    torch.save({"model": state}, directory / "consolidated.00-of-01.model.pth")
    (directory / "config.json").write_text(json.dumps(cfg))
    (directory / "meta.json").write_text(json.dumps({"llama_type": "llama"}))
    shutil.copy(TOKENIZER / "tokenizer.model", directory / "tokenizer.model")
    return directory


def to_hf(model: MetaModel):
    import transformers
    a = model.args
    n_kv = a.n_kv_heads or a.n_heads
    config = transformers.LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
        num_key_value_heads=n_kv, intermediate_size=ffn_hidden_dim(a.dim, a.multiple_of, a.ffn_dim_multiplier),
        rms_norm_eps=a.norm_eps, max_position_embeddings=a.max_seq_len, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(a.rope_theta)}, dtype=torch.bfloat16)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(config)
    sd = model.llma.state_dict()

    def rotate(w, heads):
        return w.view(heads, w.shape[0] // heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
    mapped = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
              "lm_head.weight": sd["output.weight"]}
    for i in range(a.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        mapped.update({
            q + "self_attn.q_proj.weight": rotate(sd[p + "attention.wq.weight"], a.n_heads),
            q + "self_attn.k_proj.weight": rotate(sd[p + "attention.wk.weight"], n_kv),
            q + "self_attn.v_proj.weight": sd[p + "attention.wv.weight"],
            q + "self_attn.o_proj.weight": sd[p + "attention.wo.weight"],
            q + "mlp.gate_proj.weight": sd[p + "feed_forward.w1.weight"],
            q + "mlp.down_proj.weight": sd[p + "feed_forward.w2.weight"],
            q + "mlp.up_proj.weight": sd[p + "feed_forward.w3.weight"],
            q + "input_layernorm.weight": sd[p + "attention_norm.weight"],
            q + "post_attention_layernorm.weight": sd[p + "ffn_norm.weight"]})
    hf.load_state_dict({k: v.contiguous().clone() for k, v in mapped.items()}, assign=True, strict=False)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=config)  # rebuild its buffers off the meta device
    return hf.eval()


def median_time(fn, repeats: int, warm_up: bool = True) -> float:
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prompts(batch: int, length: int):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(100, VOCAB, (batch, length), generator=gen)


def ours_runner(model: MetaModel, environment: dict = None):
    """``environment``: variables set while it runs (the KV cache is allocated per run). Every
    runner's ``run(ids, new_tokens)`` returns the seconds from its first new token to its last."""
    engine = GenerationEngine(model.llma, model.tokenizer, eos_ids=[])  # no early stop on random weights

    def run(ids: torch.Tensor, new_tokens: int) -> float:
        first = None
        with mock.patch.dict(os.environ, environment or {}):
            for _ in engine.run(ids.tolist(), [new_tokens] * ids.shape[0], SamplingParams()):
                first = first or time.perf_counter()  # (the engine yields once per new token)
        return time.perf_counter() - first
    return run



def hf_runner(hf):
    import transformers

    class FirstToken(transformers.LogitsProcessor):
        """Notes when generate first holds logits: the prompt's forward pass is done."""
        first = None

        def __call__(self, input_ids, scores):
            self.first = self.first or time.perf_counter()
            return scores

    def run(ids: torch.Tensor, new_tokens: int) -> float:
        clock = FirstToken()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                        logits_processor=transformers.LogitsProcessorList([clock]))
        return time.perf_counter() - clock.first
    return run


def measure(run, new_tokens: int, repeats: int, metrics=METRICS, warm_up: bool = True) -> dict:
    """tok/s of ``run(ids, new_tokens)`` for each of ``metrics`` (see the module notes)."""
    rates = {}
    for metric in metrics:
        if metric.startswith("ctx"):  # no warm-up: the other metrics' runs did it
            long_prompt = prompts(1, int(metric[3:]))
            rates[metric] = new_tokens / statistics.median(run(long_prompt, new_tokens + 1) for _ in range(repeats))
    if "decode" in metrics:
        one = prompts(1, 16)
        t1 = median_time(lambda: run(one, 1), repeats, warm_up)
        tn = median_time(lambda: run(one, new_tokens + 1), repeats, warm_up)
        rates["decode"] = new_tokens / (tn - t1)
    if "prefill" in metrics:
        long_prompt = prompts(1, 128)
        rates["prefill"] = 128 / median_time(lambda: run(long_prompt, 1), repeats, warm_up)
    if "batch16" in metrics:
        batch = prompts(16, 16)
        b1 = median_time(lambda: run(batch, 1), repeats, warm_up)
        bn = median_time(lambda: run(batch, new_tokens + 1), repeats, warm_up)
        rates["batch16"] = 16 * new_tokens / (bn - b1)
    return rates


def measure_interleaved(shape: str, runners: dict, new_tokens: int, repeats: int, metrics=METRICS) -> dict:
    """{(shape, engine): rates}: every engine loaded at once and measured in rounds, one sample of
    each per round, medians over rounds. A shared machine's speed drifts over minutes; engines
    measured one after another would carry that drift into their ratios."""
    samples = {engine: [] for engine in runners}
    for round_ in range(repeats):
        for engine, run in runners.items():
            samples[engine].append(measure(run, new_tokens, 1, metrics, warm_up=round_ == 0))
        print(f"  {shape} round {round_ + 1}/{repeats}: decode " + "  ".join(
            f"{engine} {samples[engine][-1]['decode']:.1f}" for engine in runners) + " tok/s", flush=True)
    return {(shape, engine): {metric: statistics.median(s[metric] for s in rates) for metric in metrics}
            for engine, rates in samples.items()}


def llama_cpp_missing() -> str:
    """Why llama.cpp cannot run here ('' when it can)."""
    try:
        importlib.import_module("llama_cpp")
    except (ImportError, OSError) as exc:  # OSError: a build whose shared library does not load
        return f"llama-cpp-python is not installed ({exc}); pip install llama-cpp-python (builds llama.cpp, minutes)"
    return ""


def export_ggufs(directory: Path, types, into: Path = None) -> dict:
    """{type: path} of the checkpoint in ``directory`` written as GGUF into ``into`` (default: next to
    it), kept for later runs."""
    paths = {}
    for gguf_type in types:
        path = (into or directory) / f"model.{gguf_type}.gguf"
        if not path.exists():
            export_gguf(directory, path, gguf_type, progress=False)
        paths[gguf_type] = path
    return paths


class LlamaCpp:
    """One GGUF model in llama.cpp through llama-cpp-python's bindings of the C API.

    ``run(ids, new_tokens)`` has the contract of ``ours_runner``: the (streams, length) prompts go in as one
    llama_batch (sequence id = stream), then one llama_decode per new token with the greedy token of every
    stream; the KV cache is cleared first. A context per stream count, built on first use."""

    BATCH = 512  # tokens a llama_decode call takes (a longer prompt goes in several)

    def __init__(self, path: Path, threads: int, max_tokens: int):
        import llama_cpp
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load messages
        self.lib, self.threads, self.max_tokens = llama_cpp, threads, max_tokens
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.contexts = {}

    def _context(self, streams: int):
        if streams not in self.contexts:
            lib = self.lib
            params = lib.llama_context_default_params()
            per_stream = (self.max_tokens + 255) // 256 * 256
            params.n_ctx = streams * per_stream
            params.n_batch = params.n_ubatch = self.BATCH
            params.n_seq_max = streams
            params.n_threads = params.n_threads_batch = self.threads
            ctx = lib.llama_init_from_model(self.model, params)
            if not ctx:
                raise RuntimeError("llama.cpp could not create a context")
            self.contexts[streams] = (ctx, lib.llama_batch_init(self.BATCH, 0, 1))
        return self.contexts[streams]

    def _decode(self, ctx, batch, entries) -> None:
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(entries)
        code = self.lib.llama_decode(ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def _greedy(self, ctx, index: int) -> int:
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(ctx, index), shape=(self.n_vocab,))
        return int(logits.argmax())

    def run(self, ids: torch.Tensor, new_tokens: int) -> float:
        streams, length = ids.shape
        ctx, batch = self._context(streams)
        self.lib.llama_memory_clear(self.lib.llama_get_memory(ctx), True)
        prompt = ids.tolist()
        entries = [(t, p, s, p == length - 1) for s in range(streams) for p, t in enumerate(prompt[s])]
        last = (len(entries) - 1) // self.BATCH * self.BATCH  # the last batch holds every stream's last token
        if length - 1 < last:
            raise ValueError(f"{streams} prompts of {length} tokens do not fit one batch of {self.BATCH}")
        for start in range(0, len(entries), self.BATCH):
            self._decode(ctx, batch, entries[start:start + self.BATCH])
        tokens = [self._greedy(ctx, (s + 1) * length - 1 - last) for s in range(streams)]
        first = time.perf_counter()
        for step in range(new_tokens - 1):
            self._decode(ctx, batch, [(tokens[s], length + step, s, True) for s in range(streams)])
            tokens = [self._greedy(ctx, s) for s in range(streams)]
        return time.perf_counter() - first

    def close(self) -> None:
        for ctx, batch in self.contexts.values():
            self.lib.llama_batch_free(batch)
            self.lib.llama_free(ctx)
        self.contexts = {}
        self.lib.llama_model_free(self.model)


def load_ours(directory: Path, weights: str, max_seq_len: int = 512) -> MetaModel:
    return MetaModel.from_pretrained(str(directory), max_seq_len=max_seq_len, dtype=torch.bfloat16, device="cpu",
                                     quant=None if weights == "bf16" else weights, progress=False)


def print_table(title: str, columns, rows) -> None:
    """rows: (shape, metric, [value or None per column]); a column named 'x NAME' is a ratio."""
    width = max([6] + [len(shape) + 1 for shape, _, _ in rows])
    print(f"\n{title}")
    print(f"{'shape':<{width}}{'metric':<9}" + "".join(f"{c:>{max(10, len(c) + 2)}}" for c in columns))
    for shape, metric, values in rows:
        cells = "".join(f"{'n/a' if v is None else (f'{v:.2f}' if c.startswith('x ') else f'{v:.1f}'):>{max(10, len(c) + 2)}}"
                        for c, v in zip(columns, values))
        print(f"{shape:<{width}}{metric:<9}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["XS"], choices=list(SHAPES) + list(REAL),
                        help="model shapes (default XS; the issue's full table is --shapes XS S; smollm2: "
                             "the embedded demo model's real weights)")
    parser.add_argument("--peers", nargs="*", default=["hf", "llama.cpp"], choices=["hf", "llama.cpp"],
                        help="engines to compare with (default both; none: ours only)")
    parser.add_argument("--gguf-types", nargs="+", default=["f16", "q8_0", "q4_0"], choices=GGUF_TYPES,
                        help="GGUF files llama.cpp runs; q8_0 / q4_0 also run our int8 / int4 (default all three)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "accessory-bench"))
    parser.add_argument("--small-pages", action="store_true",
                        help="also run ours bf16 with its weights and KV cache in 4 KiB pages (ACCESSORY_HUGE_PAGES=0)")
    parser.add_argument("--context", type=int, default=0,
                        help="also measure one stream's decode after a prompt of this many tokens (metric ctxN)")
    args = parser.parse_args()
    metrics = METRICS + ((f"ctx{args.context}",) if args.context > 0 else ())
    longest = max(128, args.context) + args.new_tokens + 1  # positions a run needs
    max_seq_len = max(512, longest)  # ours (HF takes the same from our model's arguments)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    why_not = llama_cpp_missing() if "llama.cpp" in args.peers else "not asked for (--peers)"
    if why_not:
        print(f"llama.cpp: skipped, {why_not}", flush=True)
    gguf_types = args.gguf_types if not why_not else []
    ours_weights = ["bf16"] + [OURS_FOR_GGUF[t] for t in gguf_types if OURS_FOR_GGUF[t] != "bf16"]
    results = {}  # (shape, engine) -> rates
    for shape in args.shapes:
        if shape in REAL:
            directory, gguf_dir = Path(REAL[shape]()), Path(args.workdir) / shape
            gguf_dir.mkdir(parents=True, exist_ok=True)
        else:
            directory = gguf_dir = build_checkpoint(shape, Path(args.workdir))
        runners, peers = {}, []  # engine -> run(ids, new_tokens); llama.cpp models to close
        try:
            for weights in dict.fromkeys(ours_weights):
                model = load_ours(directory, weights, max_seq_len)
                runners[weights] = ours_runner(model)
                if weights == "bf16":
                    in_panels = sum(type(m) is PanelLinear for m in model.llma.modules())
                    print(f"{shape}: ours bf16 with {in_panels} linears in 16-row panels "
                          f"({'ACCESSORY_PANELS=0 keeps rows' if in_panels else 'rows: see panel_linear.panels_wanted'})",
                          flush=True)
                    if "hf" in args.peers:
                        runners["hf"] = hf_runner(to_hf(model))  # (reads the state_dict: the panels stay)
                    if args.small_pages:
                        small = {"ACCESSORY_HUGE_PAGES": "0"}
                        with mock.patch.dict(os.environ, small):
                            runners["bf16 4k"] = ours_runner(load_ours(directory, weights, max_seq_len), small)
            for gguf_type, path in export_ggufs(directory, gguf_types, gguf_dir).items():
                peers.append(LlamaCpp(path, args.threads, max_tokens=longest))
                runners[f"llama.cpp {gguf_type}"] = peers[-1].run
            results.update(measure_interleaved(shape, runners, args.new_tokens, args.repeats, metrics))
        finally:
            for peer in peers:
                peer.close()

    def value(shape, engine, metric):
        return results.get((shape, engine), {}).get(metric)

    def ratio(shape, a, b, metric):
        x, y = value(shape, a, metric), value(shape, b, metric)
        return None if x is None or y is None else x / y

    header = f"{args.threads} threads, {args.new_tokens} new tokens, median of {args.repeats} interleaved rounds"
    columns = ["ours bf16"]
    if args.small_pages:
        columns += ["ours 4k pages", "x 4k pages"]
    if "hf" in args.peers:
        columns += ["HF bf16", "x HF"]
    if "f16" in gguf_types or "bf16" in gguf_types:
        half = "f16" if "f16" in gguf_types else "bf16"
        columns += [f"llama.cpp {half}", f"x llama.cpp {half}"]
    rows = []
    for shape in args.shapes:
        for metric in metrics:
            values = []
            for column in columns:
                if column == "x HF":
                    values.append(ratio(shape, "bf16", "hf", metric))
                elif column == "x 4k pages":
                    values.append(ratio(shape, "bf16", "bf16 4k", metric))
                elif column.startswith("x llama.cpp"):
                    values.append(ratio(shape, "bf16", column[2:], metric))
                else:
                    values.append(value(shape, {"ours bf16": "bf16", "HF bf16": "hf", "ours 4k pages": "bf16 4k"}
                                        .get(column, column), metric))
            rows.append((shape, metric, values))
    print_table(f"16-bit weights, tok/s ({header})", columns, rows)
    quantized = [t for t in gguf_types if t in ("q8_0", "q4_0")]
    if quantized:
        columns, rows = [], []
        for t in quantized:
            columns += [f"ours {OURS_FOR_GGUF[t]}", f"llama.cpp {t}", f"x llama.cpp {t}"]
        for shape in args.shapes:
            for metric in metrics:
                values = []
                for t in quantized:
                    ours, theirs = OURS_FOR_GGUF[t], f"llama.cpp {t}"
                    values += [value(shape, ours, metric), value(shape, theirs, metric),
                               ratio(shape, ours, theirs, metric)]
                rows.append((shape, metric, values))
        print_table(f"quantized weights, tok/s ({header})", columns, rows)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
