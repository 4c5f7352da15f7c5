"""``accessory quantize``: write a pre-quantized checkpoint (quantize once, load many times)."""

import argparse

QUANT_HELP = ("weight-only quantization: int8 (per channel), int4 (groups of 32; int4-g64 / int4-g128 for "
              "larger groups), nf4; bare --quant = 4-bit for the device (int4 on CPU, nf4 on CUDA)")


def add_quant_flag(parser: argparse.ArgumentParser, name: str = "--quant") -> None:
    """``--quant [SCHEME]`` for the commands that load a model (a bare flag means ``True``)."""
    parser.add_argument(name, nargs="?", const=True, default=False, metavar="SCHEME", help=QUANT_HELP)


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..tools import run_writer

    def work():
        import torch

        from ..model.meta import MetaModel
        from .checkpoint import save_quantized
        if args.threads:
            torch.set_num_threads(args.threads)
        model = MetaModel.from_pretrained(args.src, llama_type=args.llama_type, dtype=args.dtype,
                                          device="cpu", quant=args.quant, max_seq_len=args.max_seq_len)
        return save_quantized(model, args.dst, sources=[args.src])
    try:
        return run_writer(work, notes=True)
    except ValueError as exc:
        print(f"error: {exc}")
        return 1


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "quantize", help="write a pre-quantized checkpoint (int8 / int4 / nf4)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load a full-precision checkpoint, pack its linear layers (weight-only quantization, "
                    "as MetaModel.from_pretrained(quant=...) does) and write them as a one-shard checkpoint "
                    "whose meta.json records the format; config.json and the tokenizer are copied. "
                    "MetaModel.from_pretrained(DST) then loads the packed weights directly.",
        epilog="examples:\n"
               "  accessory quantize /models/llama2-7b /models/llama2-7b-int4 --quant int4\n"
               "  accessory quantize ./smollm2 ./smollm2-int8 --quant int8 --dtype bf16\n"
               "  accessory chat /models/llama2-7b-int4")
    parser.add_argument("src", help="full-precision checkpoint directory (any shard count)")
    parser.add_argument("dst", help="output directory (new or empty)")
    parser.add_argument("--quant", default="int4", help=QUANT_HELP.split(";")[0] + " (default int4)")
    parser.add_argument("--dtype", default="bf16",
                        help="dtype of what stays in full precision: embeddings, norms, biases (default bf16)")
    parser.add_argument("--llama_type", default=None, help="architecture, when the source has no meta.json")
    parser.add_argument("--max-seq-len", type=int, default=2048, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    parser.set_defaults(func=cmd_quantize)
    return parser
