"""Multi-turn chat: how long each turn waits for its first token, with and without the prompt cache,
against llama.cpp (which reuses a matching prompt prefix the same way) on the same random weights.

    python benchmarks/chat_turns.py [--shape XS|S] [--turns 8] [--message-tokens 48] [--new-tokens 16]
                                    [--threads 2] [--repeats 3] [--no-llama-cpp] [--image-words N]

A chat face sends the whole conversation every turn: turn k's prompt is BOS, then for every earlier
turn its user message and its answer, then the new user message. The messages and answers here are
fixed random token ids (the weights are random, so generated answers would mean nothing); each
turn then generates --new-tokens greedy tokens with no stop token. With the cache, a turn prefills
the last answer and the new message instead of the whole conversation.

Engines, each run through the whole conversation once per round, in interleaved rounds:
  ours cache  GenerationEngine with prompt_cache=True (as `accessory chat`, the multi-turn demo and
              `accessory serve` run it)
  ours fresh  prompt_cache=False (MetaModel.generate / stream_generate unless asked for)
  llama.cpp   llama-cpp-python's Llama.generate on the F16 GGUF export, whose context keeps the
              previous prompt and decodes only the tokens after the longest shared prefix
With --image-words N the conversation is about one picture: N vectors (random, of the token
embeddings' scale) after BOS in every turn's prompt, where SPHINX's ``tagged`` layout puts an
image (SPHINX-Tiny's five 224-pixel views insert 5 x 259 = 1,295). The text model takes them as
any multimodal type's decoder does; the encoders' own time is image_encode.py's (and MetaModel
keeps the last encodings). llama.cpp takes no part then.

Prints, per engine, the median over rounds of: the median time to first token over turns 2..N,
the last turn's time to first token, and the whole conversation's time; then the ratios.
"""

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode import SHAPES, VOCAB, build_checkpoint, export_ggufs, llama_cpp_missing  # noqa: E402

from accessory.generation.engine import GenerationEngine  # noqa: E402
from accessory.generation.sampling import SamplingParams  # noqa: E402
from accessory.model.meta import MetaModel  # noqa: E402


def conversation(turns: int, message_tokens: int):
    """[(user ids, scripted answer ids)] per turn, fixed random ids."""
    gen = torch.Generator().manual_seed(7)
    return [(torch.randint(100, VOCAB, (message_tokens,), generator=gen).tolist(),
             torch.randint(100, VOCAB, (message_tokens,), generator=gen).tolist()) for _ in range(turns)]


def prompts(script, bos: int):
    """Turn k's prompt: BOS, the earlier turns' messages and answers, then message k."""
    out, history = [], [bos]
    for message, answer in script:
        out.append(history + message)
        history = history + message + answer
    return out


class Ours:
    def __init__(self, model, prompt_cache: bool, image=None):
        self.engine = GenerationEngine(model.llma, model.tokenizer, eos_ids=[], prompt_cache=prompt_cache)
        self.image = image  # (1, N, dim) or None

    def turn(self, ids, new_tokens: int):
        """(seconds to the first token, seconds for the turn)"""
        t0 = time.perf_counter()
        first = None
        for _ in self.engine.run([ids], [new_tokens], SamplingParams(), image_embeds=self.image):
            if first is None:
                first = time.perf_counter() - t0
        return first, time.perf_counter() - t0

    def reset(self):
        self.engine.clear_prompt_cache()


class LlamaCppChat:
    def __init__(self, path: Path, threads: int, n_ctx: int):
        import llama_cpp
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=512, verbose=False)

    def turn(self, ids, new_tokens: int):
        t0 = time.perf_counter()
        first = None
        for count, _ in enumerate(self.llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                                    repeat_penalty=1.0), start=1):
            if first is None:
                first = time.perf_counter() - t0
            if count == new_tokens:
                break
        return first, time.perf_counter() - t0

    def reset(self):
        self.llm.reset()


def run_conversation(engine, turn_prompts, new_tokens: int):
    engine.reset()  # each round starts a new conversation
    times = [engine.turn(ids, new_tokens) for ids in turn_prompts]
    firsts = [t[0] for t in times]
    return {"ttft": statistics.median(firsts[1:]), "last ttft": firsts[-1], "total": sum(t[1] for t in times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="XS", choices=list(SHAPES))
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--message-tokens", type=int, default=48, help="tokens of each message and each answer")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--image-words", type=int, default=0,
                        help="a picture of this many vectors after BOS in every turn (no llama.cpp then)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "accessory-bench"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    directory = build_checkpoint(args.shape, Path(args.workdir))
    script = conversation(args.turns, args.message_tokens)
    n_ctx = 1 + 2 * args.turns * args.message_tokens + args.new_tokens
    model = MetaModel.from_pretrained(str(directory), max_seq_len=n_ctx + args.image_words, dtype=torch.bfloat16,
                                      device="cpu", progress=False)
    turn_prompts = prompts(script, model.tokenizer.bos_id)
    image = None
    if args.image_words:
        model.llma.image_layout = "tagged"  # the text decoder takes the vectors as SPHINX's does
        scale = model.llma.tok_embeddings.weight.float().std()
        image = (scale * torch.randn(1, args.image_words, model.llma.tok_embeddings.weight.shape[1],
                                     generator=torch.Generator().manual_seed(8))).to(torch.bfloat16)
    engines = {"ours cache": Ours(model, True, image), "ours fresh": Ours(model, False, image)}
    why_not = ("--no-llama-cpp" if args.no_llama_cpp else "--image-words (it takes no pictures here)"
               if args.image_words else llama_cpp_missing())
    if why_not:
        print(f"llama.cpp: skipped, {why_not}", flush=True)
    else:
        engines["llama.cpp f16"] = LlamaCppChat(export_ggufs(directory, ["f16"])["f16"], args.threads, n_ctx)
    print(f"{args.shape}: {args.turns} turns of {args.message_tokens}-token messages and answers, "
          f"last prompt {len(turn_prompts[-1])} tokens, {args.new_tokens} new tokens a turn"
          + (f", a picture of {args.image_words} vectors after BOS" if args.image_words else ""), flush=True)
    for engine in engines.values():  # warm-up: kernels built, caches touched
        run_conversation(engine, turn_prompts[:2], 2)
    samples = {name: [] for name in engines}
    for round_index in range(args.repeats):
        for name, engine in engines.items():
            samples[name].append(run_conversation(engine, turn_prompts, args.new_tokens))
        print(f"  round {round_index + 1}/{args.repeats}: " + "  ".join(
            f"{name} ttft {samples[name][-1]['ttft'] * 1e3:.0f} ms total {samples[name][-1]['total']:.2f} s"
            for name in engines), flush=True)
    result = {name: {key: statistics.median(s[key] for s in runs) for key in runs[0]} for name, runs in samples.items()}
    print(f"\n{args.threads} threads, median of {args.repeats} interleaved rounds; "
          f"ttft = median time to first token over turns 2..{args.turns}")
    print(f"{'engine':<14} {'ttft ms':>9} {'last ttft ms':>13} {'total s':>8}")
    for name, r in result.items():
        print(f"{name:<14} {r['ttft'] * 1e3:9.0f} {r['last ttft'] * 1e3:13.0f} {r['total']:8.2f}")
    print()
    for other in [name for name in result if name != "ours cache"]:
        o, c = result[other], result["ours cache"]
        print(f"{other} / ours cache time (above 1: ours cache is faster): ttft {o['ttft'] / c['ttft']:.2f}x, "
              f"last ttft {o['last ttft'] / c['last ttft']:.2f}x, whole conversation {o['total'] / c['total']:.2f}x")


if __name__ == "__main__":
    main()
